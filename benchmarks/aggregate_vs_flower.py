#!/usr/bin/env python3
"""FedAvg aggregation cost: fedadapt vs Flower 1.42's ``aggregate_arrayrecords``, against a memcpy.

Acceptance being measured:

    FedAvg aggregation of 10 replies of 10M float32 parameters takes at most 1.5x the time of
    one memory copy of those replies (in-place accumulation straight from the received
    buffers, no per-array temporaries); measured side by side with Flower's own
    ``aggregate_arrayrecords``.

Setup (as in shared/docs/FLOWER-NOTES.md section 4): 10 replies, each 20 tensors of 500x1000
float32 (10.0M parameters, 38 MiB per reply, 381 MiB in all), example counts 100, 107, ... .
Every reply is generated from ``torch.Generator().manual_seed(SEED + k)`` so both venvs hold
bit-identical arrays, and the results are cross-checked (per-tensor sums).

What is timed (each a median over ``--repeats`` runs, per torch thread setting):

  (a)    fedadapt ``FedAvg.aggregate`` (built with ``strategies.base.build``) on already-decoded
         replies.
  (b)    ``codec.decode(payload, contract=...)`` of each received reply + (a): what the coordinator
         does with what it receives. The replies are bytearrays, as ``proto.chunks.Reassembler``
         returns them, so decode hands out views into them (no copy). Broken down into the decode
         alone and the codec's checks (dtype whitelist, finiteness, contract); for comparison,
         safetensors' own ``load`` (which copies every tensor) of the same bytes.
  (c)    the baseline: one ``copy_`` of all reply bytes (381 MiB, one contiguous source) into a
         preallocated buffer; (c_each) ten ``copy_`` calls straight from the ten payloads.
  (d)    Flower's ``aggregate_arrayrecords`` on RecordDicts holding ``ArrayRecord`` + ``MetricRecord
         ({"num-examples": n})`` of the same arrays, run in benchmarks/.venv-flower as a subprocess
         (same machine, same shapes); (d_numpy) of which ``Array.numpy()`` deserialisation.
  context: sha256 of all reply bytes (what ``proto.chunks.Reassembler`` checks per reply), to put
         the aggregation in proportion.

Within a process the measurements are interleaved (each repeat runs every measurement once, in
a shuffled order), so background load hits all of them alike. Load is recorded: 1-min loadavg,
busy cores before each side, and the CPU that *other* processes used during each side
(``background_cores``; ~0 on a quiet machine, up to 2 on this 2-core box).

Usage (from the repository root):

    .venv/bin/python benchmarks/aggregate_vs_flower.py                  # both sides, 15 repeats
    .venv/bin/python benchmarks/aggregate_vs_flower.py --repeats 25 --threads default,1
    .venv/bin/python benchmarks/aggregate_vs_flower.py --skip-flower    # fedadapt side only

Writes benchmarks/results/aggregate_vs_flower.json (atomically) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
FLOWER_VENV = BENCH_DIR / ".venv-flower"
FLOWER_PY = FLOWER_VENV / "bin" / "python"
RESULTS_JSON = BENCH_DIR / "results" / "aggregate_vs_flower.json"

NUM_REPLIES = 10
NUM_TENSORS = 20
SHAPE = (500, 1000)
SEED = 1234
EXAMPLES = [100 + 7 * k for k in range(NUM_REPLIES)]
MB = 1024 * 1024


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- shared helpers
# (also pasted into the Flower worker below, which runs in another venv)

COMMON_SRC = r'''
import gc, os, statistics, time

def make_arrays(k, num_tensors, shape, seed):
    """Reply k's tensors: bit-identical in both venvs (same torch, same generator)."""
    import torch
    g = torch.Generator().manual_seed(seed + k)
    return {f"layer{j:02d}.weight": torch.randn(*shape, generator=g) for j in range(num_tensors)}

def timed(fn):
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    del out
    return dt * 1e3

class CpuMeter:
    """CPU used by OTHER processes (cores) over a stretch of wall time: machine busy time from
    /proc/stat minus this process's own CPU time (and that of waited-for children)."""
    def _busy(self):
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return (sum(v) - idle) / os.sysconf("SC_CLK_TCK")
    def _own(self):
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system
    def __enter__(self):
        self.b0, self.o0, self.w0 = self._busy(), self._own(), time.perf_counter()
        return self
    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.own = self._own() - self.o0
        other = max(0.0, (self._busy() - self.b0) - self.own)
        self.background_cores = round(other / self.wall, 3) if self.wall > 0 else None
        return False
'''
exec(COMMON_SRC)  # defines make_arrays, timed, CpuMeter here too


def busy_cores(period: float = 1.0) -> float:
    """Cores the whole machine kept busy over ``period`` s (nothing of ours runs meanwhile)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)
    t0, i0 = snap()
    time.sleep(period)
    t1, i1 = snap()
    n = os.cpu_count() or 1
    return round(n * (1 - (i1 - i0) / (t1 - t0)), 2) if t1 > t0 else 0.0


def wait_for_quiet(max_wait: float, threshold: float) -> dict:
    t0 = time.monotonic()
    b = busy_cores()
    warned = False
    while b > threshold and time.monotonic() - t0 < max_wait:
        if not warned:
            log(f"[load] machine busy ({b} cores); waiting up to {max_wait:.0f}s for it to go quiet")
            warned = True
        time.sleep(2)
        b = busy_cores()
    if b > threshold:
        log(f"[load] still {b} cores busy: measuring anyway, timings will be inflated")
    return {"busy_cores_before": b, "waited_s": round(time.monotonic() - t0, 1),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def stats(ms: list[float]) -> dict:
    return {"median_ms": round(statistics.median(ms), 3), "min_ms": round(min(ms), 3),
            "max_ms": round(max(ms), 3), "n": len(ms), "runs_ms": [round(x, 3) for x in ms]}


# ------------------------------------------------------------------ fedadapt side

def run_fedadapt(threads: int | None, repeats: int, warmup: int) -> dict:
    import torch

    from fedadapt.core import codec
    from fedadapt.strategies.base import ClientResult, ModelSpec, RunSettings, build
    from fedadapt.strategies.fedavg import weighted_average, weights

    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    if threads is not None:
        torch.set_num_threads(threads)
    nthreads = torch.get_num_threads()

    models = [make_arrays(k, NUM_TENSORS, SHAPE, SEED) for k in range(NUM_REPLIES)]
    payloads = [codec.encode(m) for m in models]
    contract = codec.contract_of(models[0])
    total_bytes = sum(t.numel() * t.element_size() for m in models for t in m.values())
    server, _ = build({"name": "fedavg"}, RunSettings(seed=0, rounds=1, clients_per_round=NUM_REPLIES,
                                                      train={"lr": 0.1}))
    state = server.init_state(ModelSpec({k: torch.zeros_like(v) for k, v in models[0].items()}))
    p = weights(EXAMPLES, "examples")

    def results_of(tensor_dicts):
        return [ClientResult(f"c{k}", EXAMPLES[k], t) for k, t in enumerate(tensor_dicts)]

    decoded = results_of(models)
    src_flat = torch.cat([t.reshape(-1) for m in models for t in m.values()])
    dst_flat = torch.empty_like(src_flat)
    dst_flat.fill_(0)  # fault the destination in once: "preallocated" means warm
    payload_views = [torch.frombuffer(pl, dtype=torch.uint8) for pl in payloads]
    dst_bytes = torch.empty(sum(len(pl) for pl in payloads), dtype=torch.uint8)
    dst_bytes.fill_(0)
    received = [bytearray(pl) for pl in payloads]  # what the coordinator holds after reassembly

    def a():
        return server.aggregate(1, decoded, state)

    def a_wavg():
        return weighted_average([r.tensors for r in decoded], p)

    def b():
        dec = [codec.decode(pl, contract=contract) for pl in received]
        return server.aggregate(1, results_of(dec), state)

    def b_decode_only():
        return [codec.decode(pl, contract=contract) for pl in received]

    def b_safetensors_load_only():
        from safetensors.torch import load
        return [load(bytes(pl)) for pl in payloads]

    def check_tensors_only():
        for m in models:
            codec.check_tensors(m, contract)

    def c():
        dst_flat.copy_(src_flat)

    def c_each():
        off = 0
        for v in payload_views:
            dst_bytes[off:off + v.numel()].copy_(v)
            off += v.numel()

    def c_one_model():
        dst_flat[:src_flat.numel() // NUM_REPLIES].copy_(src_flat[:src_flat.numel() // NUM_REPLIES])

    def ctx_sha256():
        import hashlib
        return [hashlib.sha256(pl).digest() for pl in payloads]

    fns = {"a": a, "a_weighted_average_only": a_wavg, "b": b, "b_decode_only": b_decode_only,
           "b_safetensors_load_only": b_safetensors_load_only, "b_check_tensors_only": check_tensors_only,
           "c": c, "c_each": c_each, "c_one_model": c_one_model, "ctx_sha256": ctx_sha256}

    # correctness: the decoded path gives the same numbers as aggregating the original tensors
    new = a().state.tensors
    via_wire = b().state.tensors
    assert all(torch.equal(new[k], via_wire[k]) for k in new), "decoding changed the numbers"
    sums = {k: float(v.double().sum()) for k, v in new.items()}
    del new, via_wire

    runs: dict[str, list[float]] = {k: [] for k in fns}
    rng = random.Random(0)
    with CpuMeter() as cm:
        for i in range(warmup + repeats):
            order = list(fns.items())
            rng.shuffle(order)
            for name, fn in order:
                ms = timed(fn)
                if i >= warmup:
                    runs[name].append(ms)
    res = {name: stats(v) for name, v in runs.items()}
    return {"torch_threads": nthreads, "total_reply_bytes": total_bytes,
            "payload_bytes_each": len(payloads[0]), "timings": res, "result_sums": sums,
            "background_cores": cm.background_cores, "side_wall_s": round(cm.wall, 1),
            "side_cpu_s": round(cm.own, 1), "loadavg_1m_after": round(os.getloadavg()[0], 2)}


# -------------------------------------------------------------------- Flower side

FLOWER_WORKER = COMMON_SRC + r'''
import json, random, sys
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

cfg = json.loads(sys.argv[1])
if cfg["threads"] is not None:
    torch.set_num_threads(cfg["threads"])
records = []
for k in range(cfg["num_replies"]):
    arrays = make_arrays(k, cfg["num_tensors"], tuple(cfg["shape"]), cfg["seed"])
    ar = ArrayRecord({name: Array(t.numpy()) for name, t in arrays.items()})
    records.append(RecordDict({"arrays": ar, "metrics": MetricRecord({"num-examples": cfg["examples"][k]})}))
    del arrays

def d():
    return aggregate_arrayrecords(records, "num-examples")

def d_numpy():  # deserialise every Array once, dropping each result at once (as the aggregation does)
    n = 0
    for r in records:
        for ar in r.array_records.values():
            for v in ar.values():
                n += v.numpy().size
    return n

result = d()
sums = {k: float(np.asarray(v.numpy(), dtype=np.float64).sum()) for k, v in result.items()}
del result
fns = {"d": d, "d_numpy": d_numpy}
runs = {k: [] for k in fns}
rng = random.Random(0)
with CpuMeter() as cm:
    for i in range(cfg["warmup"] + cfg["repeats"]):
        order = list(fns.items()); rng.shuffle(order)
        for name, fn in order:
            ms = timed(fn)
            if i >= cfg["warmup"]:
                runs[name].append(ms)
import flwr
print(json.dumps({"runs_ms": runs, "result_sums": sums, "torch_threads": torch.get_num_threads(),
                  "numpy": np.__version__, "flwr": flwr.__version__, "torch": torch.__version__,
                  "background_cores": cm.background_cores, "side_wall_s": round(cm.wall, 1),
                  "side_cpu_s": round(cm.own, 1), "loadavg_1m_after": round(os.getloadavg()[0], 2)}))
'''


def run_flower(threads: int | None, repeats: int, warmup: int, timeout: float = 900) -> dict:
    if not FLOWER_PY.exists():
        return {"skipped": f"{FLOWER_PY} missing (create it with benchmarks/overhead_vs_flower.py)"}
    cfg = {"threads": threads, "repeats": repeats, "warmup": warmup, "num_replies": NUM_REPLIES,
           "num_tensors": NUM_TENSORS, "shape": list(SHAPE), "seed": SEED, "examples": EXAMPLES}
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update({"FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_HOME": tempfile.mkdtemp(prefix="avf-flwr-")})
    if threads is not None:  # numpy's elementwise ops are single-threaded anyway; for parity
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.NamedTemporaryFile("w", suffix="_flower_agg_worker.py", delete=False) as f:
        f.write(FLOWER_WORKER)
        script = f.name
    try:
        r = subprocess.run([str(FLOWER_PY), script, json.dumps(cfg)], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=tempfile.gettempdir())
    finally:
        os.unlink(script)
    if r.returncode != 0:
        raise RuntimeError(f"Flower worker failed (rc={r.returncode}):\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["timings"] = {k: stats(v) for k, v in out.pop("runs_ms").items()}
    return out


# -------------------------------------------------------------------------- report

def machine_facts() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    caches = {}
    for idx in range(4):
        base = Path(f"/sys/devices/system/cpu/cpu0/cache/index{idx}")
        try:
            caches[f"L{(base / 'level').read_text().strip()}{(base / 'type').read_text().strip()[0]}"] = \
                (base / "size").read_text().strip()
        except OSError:
            pass
    import torch
    return {"hostname": socket.gethostname(), "nproc": len(os.sched_getaffinity(0)), "cpu_model": cpu,
            "caches_cpu0": caches, "mem_total_gb": mem, "kernel": platform.release(),
            "python": sys.version.split()[0], "torch": torch.__version__,
            "torch_default_threads": torch.get_num_threads(),
            "thp": Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
            if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists() else None}


def _ratio(x, y):
    return None if not x or not y else round(x / y, 3)


def ratios(fa: dict, fl: dict | None) -> dict:
    t = {k: v["median_ms"] for k, v in fa["timings"].items()}
    out = {"a_over_c": _ratio(t["a"], t["c"]), "b_over_c": _ratio(t["b"], t["c"]),
           "a_over_c_each": _ratio(t["a"], t["c_each"]), "b_decode_share": _ratio(t["b_decode_only"], t["b"])}
    if fl and "timings" in fl:
        d = fl["timings"]["d"]["median_ms"]
        out.update({"d_over_a": _ratio(d, t["a"]), "d_over_b": _ratio(d, t["b"]), "d_over_c": _ratio(d, t["c"])})
    return out


ROWS = [
    ("a", "(a) fedadapt FedAvg.aggregate, decoded replies"),
    ("a_weighted_average_only", "  weighted_average alone"),
    ("b", "(b) codec.decode x10 of the received buffers + aggregate"),
    ("b_decode_only", "  of which codec.decode x10 (views, with checks)"),
    ("b_check_tensors_only", "    of which codec.check_tensors x10 (finiteness etc.)"),
    ("b_safetensors_load_only", "  for comparison: safetensors.torch.load x10 (copies)"),
    ("c", "(c) one copy_ of all reply bytes (381 MiB)"),
    ("c_each", "  (c_each) copy_ straight from the 10 payloads"),
    ("c_one_model", "  copy_ of one reply (38 MiB)"),
    ("ctx_sha256", "context: sha256 of all 10 payloads"),
]


def render(results: list[dict]) -> str:
    heads = [f"threads={r['fedadapt']['torch_threads']}" for r in results]
    lines = ["| measurement: median ms (min) | " + " | ".join(heads) + " |",
             "|---|" + "---|" * len(results)]
    for key, label in ROWS:
        lines.append(f"| {label} | " + " | ".join(
            f"{r['fedadapt']['timings'][key]['median_ms']:.1f} ({r['fedadapt']['timings'][key]['min_ms']:.1f})"
            for r in results) + " |")
    for key, label in (("d", "(d) Flower aggregate_arrayrecords"), ("d_numpy", "  of which Array.numpy() x200 (each dropped at once)")):
        cells = []
        for r in results:
            fl = r.get("flower") or {}
            cells.append(f"{fl['timings'][key]['median_ms']:.1f} ({fl['timings'][key]['min_ms']:.1f})"
                         if "timings" in fl else "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for key in ("a_over_c", "b_over_c", "d_over_a", "d_over_b"):
        lines.append(f"| ratio {key} | " + " | ".join(
            "n/a" if r["ratios"].get(key) is None else f"**{r['ratios'][key]:.2f}x**" for r in results) + " |")
    lines.append("| other load (cores) fedadapt / Flower | " + " | ".join(
        f"{r['fedadapt']['background_cores']} / {(r.get('flower') or {}).get('background_cores', 'n/a')}"
        for r in results) + " |")
    return "\n".join(lines)


def write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15, help="measured runs per measurement (>= 9)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", default="default,1",
                    help="comma list of torch thread settings; 'default' = torch's own (default: default,1)")
    ap.add_argument("--skip-flower", action="store_true")
    ap.add_argument("--idle-wait", type=float, default=60.0, help="max s to wait for a quiet machine per side")
    ap.add_argument("--idle-threshold", type=float, default=0.3, help="busy cores counted as quiet")
    ap.add_argument("--json", type=Path, default=RESULTS_JSON)
    ap.add_argument("--report", action="store_true", help="only print the table of an earlier run's --json")
    args = ap.parse_args(argv)
    if args.report:
        data = json.loads(args.json.read_text())
        print(f"Run of {data['started_utc']}: `{data['command']}`\n")
        print(render(data["results"]))
        return 0
    if args.repeats < 9:
        log("[note] fewer than 9 repeats: medians will be noisy on a shared machine")
    sys.path.insert(0, str(REPO_ROOT))

    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    settings = [None if s.strip() == "default" else int(s) for s in args.threads.split(",")]
    results = []
    for th in settings:
        label = "default" if th is None else th
        entry: dict = {"threads_setting": label}
        entry["fedadapt_load_before"] = wait_for_quiet(args.idle_wait, args.idle_threshold)
        log(f"[fedadapt] threads={label}: {args.repeats} repeats (+{args.warmup} warm-up) ...")
        entry["fedadapt"] = run_fedadapt(th, args.repeats, args.warmup)
        if args.skip_flower:
            entry["flower"] = {"skipped": "--skip-flower"}
        else:
            entry["flower_load_before"] = wait_for_quiet(args.idle_wait, args.idle_threshold)
            log(f"[flower] threads={label}: {args.repeats} repeats (+{args.warmup} warm-up) ...")
            entry["flower"] = run_flower(th, args.repeats, args.warmup)
            fs, ls = entry["fedadapt"]["result_sums"], entry["flower"].get("result_sums") or {}
            if ls:
                worst = max(abs(fs[k] - ls[k]) / max(abs(fs[k]), 1.0) for k in fs)
                entry["flower_vs_fedadapt_sum_rel_diff"] = worst
                if worst > 1e-3:
                    log(f"[check] WARNING: Flower and fedadapt results differ (rel {worst:.2e})")
        entry["ratios"] = ratios(entry["fedadapt"], entry.get("flower"))
        results.append(entry)

    data = {
        "benchmark": "aggregate_vs_flower",
        "started_utc": started,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "setup": {"replies": NUM_REPLIES, "tensors_per_reply": NUM_TENSORS, "shape": list(SHAPE),
                  "dtype": "float32", "params_per_reply": NUM_TENSORS * math.prod(SHAPE),
                  "num_examples": EXAMPLES, "seed": SEED},
        "method": ("Medians over --repeats runs after --warmup; within each process every repeat runs "
                   "every measurement once in a shuffled order; gc.collect() before each timing. "
                   "background_cores = CPU used by other processes / wall during that side."),
        "acceptance": "aggregate <= 1.5 x one memory copy of the replies (a_over_c; b_over_c with decoding)",
        "repeats": args.repeats, "warmup": args.warmup,
        "machine": machine_facts(),
        "results": results,
    }
    write_json(data, args.json)
    print(f"## FedAvg aggregation: {NUM_REPLIES} replies x {NUM_TENSORS} x {SHAPE[0]}x{SHAPE[1]} float32\n")
    print(f"Command: `{data['command']}`  ")
    m = data["machine"]
    print(f"Machine: nproc={m['nproc']}, {m['cpu_model']}, {m['mem_total_gb']} GB, torch {m['torch']}\n")
    print(render(results))
    print(f"\nRaw runs: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
