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

  (a)    fedadapt ``FedAvg.aggregate`` (built with ``strategies.registry.build``) on already-decoded
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
         (aggregate_flower.py; same machine, same shapes); (d_numpy) of which ``Array.numpy()`` deserialisation.
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
import json
import math
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from aggregate_common import EXAMPLES, NUM_REPLIES, NUM_TENSORS, SEED, SHAPE, interleaved, make_arrays, side_facts  # noqa: E402
from flower_env import flower_bin, flower_process_env  # noqa: E402
from harness import BENCH_DIR, REPO, RESULTS, add_json_args, log, print_report, sys_value  # noqa: E402

FLOWER_PY = flower_bin("python")
RESULTS_JSON = RESULTS / "aggregate_vs_flower.json"
MB = 1024 * 1024


def wait_for_quiet(max_wait: float, threshold: float) -> dict:
    q = harness.wait_for_quiet("load", max_wait, threshold)
    return {"busy_cores_before": q.busy_cores, "waited_s": q.waited_s, "loadavg_1m": round(q.loadavg_1m, 2)}


def stats(ms: list[float]) -> dict:
    return {"median_ms": round(statistics.median(ms), 3), "min_ms": round(min(ms), 3),
            "max_ms": round(max(ms), 3), "n": len(ms), "runs_ms": [round(x, 3) for x in ms]}


# ------------------------------------------------------------------ fedadapt side

def run_fedadapt(threads: int | None, repeats: int, warmup: int) -> dict:
    import torch

    from fedadapt.core import codec
    from fedadapt.strategies.aggregate import weighted_average, weights
    from fedadapt.strategies.base import ClientResult, ModelSpec, RunSettings
    from fedadapt.strategies.registry import build

    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    if threads is not None:
        torch.set_num_threads(threads)
    nthreads = torch.get_num_threads()

    models = [make_arrays(k) for k in range(NUM_REPLIES)]
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

    runs, cm = interleaved(fns, repeats, warmup)
    res = {name: stats(v) for name, v in runs.items()}
    return {"torch_threads": nthreads, "total_reply_bytes": total_bytes,
            "payload_bytes_each": len(payloads[0]), "timings": res, "result_sums": sums, **side_facts(cm)}


# -------------------------------------------------------------------- Flower side

def run_flower(threads: int | None, repeats: int, warmup: int, timeout: float = 900) -> dict:
    if not FLOWER_PY.exists():
        return {"skipped": f"{FLOWER_PY} missing (create it with benchmarks/overhead_vs_flower.py)"}
    cfg = {"threads": threads, "repeats": repeats, "warmup": warmup}
    # numpy's elementwise ops are single-threaded anyway; OMP_NUM_THREADS for parity
    env = flower_process_env(tempfile.mkdtemp(prefix="avf-flwr-"),
                             **({} if threads is None else {"OMP_NUM_THREADS": str(threads)}))
    r = subprocess.run([str(FLOWER_PY), str(BENCH_DIR / "aggregate_flower.py"), json.dumps(cfg)],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=tempfile.gettempdir())
    if r.returncode != 0:
        raise RuntimeError(f"Flower worker failed (rc={r.returncode}):\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["timings"] = {k: stats(v) for k, v in out.pop("runs_ms").items()}
    return out


# -------------------------------------------------------------------------- report

def machine_facts() -> dict:
    """The machine (harness.machine_facts), its caches and transparent huge pages, and torch."""
    caches = {}
    for idx in range(4):
        base = Path(f"/sys/devices/system/cpu/cpu0/cache/index{idx}")
        try:
            caches[f"L{(base / 'level').read_text().strip()}{(base / 'type').read_text().strip()[0]}"] = \
                (base / "size").read_text().strip()
        except OSError:
            pass
    import torch
    return {**harness.machine_facts(), "caches_cpu0": caches, "python": sys.version.split()[0],
            "torch": torch.__version__, "torch_default_threads": torch.get_num_threads(),
            "thp": sys_value("/sys/kernel/mm/transparent_hugepage/enabled")}


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15, help="measured runs per measurement (>= 9)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", default="default,1",
                    help="comma list of torch thread settings; 'default' = torch's own (default: default,1)")
    ap.add_argument("--skip-flower", action="store_true")
    ap.add_argument("--idle-wait", type=float, default=60.0, help="max s to wait for a quiet machine per side")
    ap.add_argument("--idle-threshold", type=float, default=0.3, help="busy cores counted as quiet")
    add_json_args(ap, RESULTS_JSON, "the table")
    args = ap.parse_args(argv)
    if args.report:
        return print_report(args.json, lambda data: render(data["results"]))
    if args.repeats < 9:
        log("[note] fewer than 9 repeats: medians will be noisy on a shared machine")
    sys.path.insert(0, str(REPO))

    started = harness.utc_now()
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
        "command": harness.command_line(),
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
    harness.write_json(args.json, data)
    print(f"## FedAvg aggregation: {NUM_REPLIES} replies x {NUM_TENSORS} x {SHAPE[0]}x{SHAPE[1]} float32\n")
    print(f"Command: `{data['command']}`  ")
    m = data["machine"]
    print(f"Machine: nproc={m['nproc']}, {m['cpu_model']}, {m['mem_total_gb']} GB, torch {m['torch']}\n")
    print(render(results))
    print(f"\nRaw runs: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
