"""One table of every LoRA method on the quickstart classifier, with and without client DP.

Methods (all on `simulations/quickstart.toml`: MiniLM, Shakespeare genre, one client per speaking role,
25 rounds x 16 roles, one local SGD step of batch 16, lr 0.3 -> 0.03): FedAvg-LoRA (naive A/B averaging,
r = 8), FedAvg-LoRA with zero-padding (ranks 4/8/16 cycled over the roles, global r = 16), FLoRA (ranks
4/8/16), Fed-SB (r = 16, the shipped voted-sign initialisation), FedEx-LoRA (r = 8), FFA-LoRA (r = 8) and
FlexLoRA (ranks 4/8/16). Only [strategy] and the adapter rank differ; nothing is tuned per method.
Client DP: privacy.dp = "client", epsilon 3 per client, delta 1e-5, per-example clip 1.0, noise
calibrated for 2 participations of a client, and the client lr 1.0 -> 0.1 that BENCHMARKS.md found makes
up for the clip at this size (the same for every method).

Each run is one process (`run`), in-process `fedadapt simulate` with one torch thread, instrumented
without changing what it computes: the strategy's `configure` and `aggregate` are timed (server time per
round, the strategy's own work: not the codec, the transport or the evaluation) and, around `aggregate`,
every module's effective update W - W0 (scaling included, fp64) of the global model is compared with the
weighted mean of the clients' models: exactness error = ||global - sum_k p_k client_k||_F /
||sum_k p_k client_k - previous global||_F over all adapted modules, per round.

    .venv/bin/python benchmarks/lora_table.py plan                        # the runs and their commands
    nice .venv/bin/python benchmarks/lora_table.py queue --jobs 2         # every missing run, 2 at a time
    .venv/bin/python benchmarks/lora_table.py run --method fedex --seed 0 [--dp]   # one run
    .venv/bin/python benchmarks/lora_table.py report                      # the table (markdown)

Results: benchmarks/results/lora_table/<method>_<nodp|dp3>_s<seed>.json (one file per run; `queue`
skips runs whose file exists, so it resumes after an interruption).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import REPO, RESULTS, command_line, log, machine_facts, utc_now, write_json

OUT = RESULTS / "lora_table"
SCENARIO = REPO / "simulations/quickstart.toml"
HETERO = "[4, 8, 16]"
SEEDS = (0, 1, 2)
DP = ["privacy.dp=client", "privacy.epsilon=3", "privacy.max_grad_norm=1.0", "privacy.planned_rounds=2",
      "train.lr=1.0", "train.lr_final=0.1"]
NOT_WIRED = "not wired: its recipe does not train through the privacy hook (DP-SGD)"
# name -> (label, overrides, DP half: True (run it), or a reason it has no row there, "" for none)
METHODS = {
    "fedavg": ("FedAvg-LoRA (r=8)", ['strategy={name="fedavg"}'], True),
    "zeropad": (f"zero-padding (ranks {HETERO}, global r=16)",
                ["adapter.rank=16", "adapter.alpha=32.0", f'strategy={{name="zeropad", ranks={HETERO}}}'], NOT_WIRED),
    "flora": (f"FLoRA (ranks {HETERO})", [f'strategy={{name="flora", ranks={HETERO}}}'], NOT_WIRED),
    "fedsb": ("Fed-SB (r=16, voted sign init)",
              ["adapter.rank=16", 'strategy={name="fedsb", init_clients=0, init_samples=32, init_upload="sign"}'],
              True),
    "fedex": ("FedEx-LoRA (r=8)", ['strategy={name="fedex-lora"}'], True),
    "ffa": ("FFA-LoRA (r=8)", ['strategy={name="ffa-lora"}'], True),
    "flexlora": (f"FlexLoRA (ranks {HETERO})", [f'strategy={{name="flexlora", ranks={HETERO}}}'], True),
    "fedex_mixed": (f"FedEx-LoRA (ranks {HETERO}, global r=16)",
                    ["adapter.rank=16", "adapter.alpha=32.0", f'strategy={{name="fedex-lora", ranks={HETERO}}}'], ""),
    # a probe, not part of the table's plan (`queue --methods flexlora_lr --seeds 0`): FlexLoRA's orthonormal A
    # makes the same lr a larger step than FedAvg-LoRA's Kaiming A (row norms 1 vs 1/sqrt(3))
    "flexlora_lr": (f"FlexLoRA (ranks {HETERO}), lr 0.1 -> 0.01",
                    [f'strategy={{name="flexlora", ranks={HETERO}}}', "train.lr=0.1", "train.lr_final=0.01"], ""),
}
PROBES = {"flexlora_lr"}


def result_path(method: str, dp: bool, seed: int) -> Path:
    return OUT / f"{method}_{'dp3' if dp else 'nodp'}_s{seed}.json"


def all_runs() -> list[tuple[str, bool, int]]:
    """Every (method, dp, seed) of the table, seeds outermost so that a partial table has whole seeds."""
    return [(m, dp, s) for s in SEEDS for dp in (False, True) for m, (_, _, private) in METHODS.items()
            if (private is True or not dp) and m not in PROBES]


# ------------------------------------------------------------------------------ effective updates
# Each method's global state and each client's upload -> {module: W - W0 (fp64, m x n, scaling included)}.
def _pairs(tensors, a_suffix: str, b_suffix: str) -> dict[str, tuple]:
    return {k[: -len(a_suffix)]: (tensors[k], tensors[k[: -len(a_suffix)] + b_suffix]) for k in tensors
            if k.endswith(a_suffix) and k[: -len(a_suffix)] + b_suffix in tensors}


def _ba(b, a):
    return b.double() @ a.double()


class Effective:
    """The effective adapted-weight change of a method's global state and of a client's model."""

    def __init__(self, method: str, cfg):
        self.method, self.cfg = method, cfg
        self.s = cfg.adapter.alpha / cfg.adapter.rank
        if method == "flora":
            self.s = float(cfg.strategy.get("alpha_per_rank", 2.0))
        if method == "fedsb":
            self.s = 1.0  # models/lorasb.py: alpha = r

    def of_global(self, t) -> dict:
        m, s = self.method, self.s
        if m == "fedavg":
            return {k: s * _ba(b, a) for k, (a, b) in _pairs(t, ".lora_A.default.weight", ".lora_B.default.weight").items()}
        if m in ("zeropad", "ffa", "flexlora", "flexlora_lr"):
            return {k: s * _ba(b, a) for k, (a, b) in _pairs(t, ".lora_A", ".lora_B").items()}
        if m == "fedex_mixed":
            return Effective("fedex", self.cfg).of_global(t)
        if m == "flora":
            return {k[: -len(".flora_delta")]: v.double() for k, v in t.items() if k.endswith(".flora_delta")}
        if m == "fedsb":
            return {k: s * t[k + ".lorasb_B"].double() @ t[k + ".lorasb_R"].double() @ t[k + ".lorasb_A"].double()
                    for k in (n[: -len(".lorasb_R")] for n in t if n.endswith(".lorasb_R"))}
        if m == "fedex":
            return {k: s * (t[k + ".fedex_base"].double() + _ba(b, a))
                    for k, (a, b) in _pairs(t, ".lora_A", ".lora_B").items()}
        raise ValueError(m)

    def of_client(self, up, before) -> dict | None:
        """A client's model from its upload and the global state it trained from (None: not a model update)."""
        m, s = self.method, self.s
        if m == "fedavg":
            return self.of_global(up)
        if m in ("zeropad", "flexlora", "flexlora_lr"):
            return {k: s * _ba(b, a) for k, (a, b) in _pairs(up, ".lora_A", ".lora_B").items()}
        if m == "flora":
            return {k: before[k + ".flora_delta"].double() + s * _ba(b, a)
                    for k, (a, b) in _pairs(up, ".lora_A", ".lora_B").items()}
        if m == "fedsb":
            if not any(k.endswith(".lorasb_R") for k in up):
                return None  # the initialisation round's gradients
            return self.of_global({**{k: v for k, v in before.items() if k.endswith((".lorasb_B", ".lorasb_A"))},
                                   **up})
        if m in ("fedex", "fedex_mixed"):
            out = {}
            for k, (a, b) in _pairs(up, ".lora_A", ".lora_B").items():
                r = a.shape[0]  # a client of lower rank holds the rest of the global factors frozen
                tail = _ba(before[k + ".lora_B"][:, r:], before[k + ".lora_A"][r:])
                out[k] = s * (before[k + ".fedex_base"].double() + _ba(b, a) + tail)
            return out
        if m == "ffa":
            return {k[: -len(".lora_B")]: s * _ba(v, before[k[: -len(".lora_B")] + ".lora_A"])
                    for k, v in up.items() if k.endswith(".lora_B")}
        raise ValueError(m)


def _norm2(d: dict) -> float:
    return sum(float(v.pow(2).sum()) for v in d.values())


# ------------------------------------------------------------------------------ one run
def run_one(method: str, seed: int, dp: bool, rounds: int, per_round: int, final: int, extra: list[str]) -> dict:
    import torch

    torch.set_num_threads(1)
    from rich.console import Console

    from fedadapt.core.config import load_config
    from fedadapt.simulation.runner import in_process, simulate

    overrides = [f"seed={seed}", f"rounds={rounds}", f"clients_per_round={per_round}",
                 f"eval.final_max_examples={final}", "eval.every=1000", *METHODS[method][1], *(DP if dp else []), *extra]
    cfg = load_config(SCENARIO, overrides)
    eff = Effective(method, cfg)
    per_round_rows: dict[int, dict] = {}

    def instrumented(run, clients, on_client_done):
        inner = getattr(run.strategy, "inner", run.strategy)  # under [privacy]: the strategy it wraps
        configure, aggregate = inner.configure, inner.aggregate

        def timed_configure(rnd, clients_, state):
            t0 = time.perf_counter()
            tasks = configure(rnd, clients_, state)
            per_round_rows.setdefault(rnd, {})["configure_s"] = time.perf_counter() - t0
            return tasks

        def measured_aggregate(rnd, results, state):
            before = dict(state.tensors)
            old = eff.of_global(before)
            models = [eff.of_client(r.tensors, before) for r in results]
            t0 = time.perf_counter()
            outcome = aggregate(rnd, results, state)
            row = per_round_rows.setdefault(rnd, {})
            row["aggregate_s"] = time.perf_counter() - t0
            if all(x is not None for x in models):
                n = [r.num_examples for r in results]
                p = [x / sum(n) for x in n] if inner.weighted_by_examples() else [1 / len(n)] * len(n)
                exact = {k: sum(pk * x[k] for pk, x in zip(p, models)) for k in models[0]}
                new = eff.of_global(outcome.state.tensors)
                err2 = _norm2({k: new[k] - exact[k] for k in exact})
                upd2 = _norm2({k: exact[k] - old[k] for k in exact})
                row["exactness_error_rel"] = math.sqrt(err2 / upd2) if upd2 > 0 else 0.0
                row["update_norm"] = math.sqrt(upd2)
            return outcome

        inner.configure, inner.aggregate = timed_configure, measured_aggregate
        return in_process(run, clients, on_client_done)

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        with open(os.devnull, "w") as sink:
            summary = simulate(cfg, Path(out), console=Console(file=sink), transport=instrumented)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r["bench"] = per_round_rows.get(r["round"], {})
    return {"method": method, "seed": seed, "dp": dp, "overrides": overrides, "summary": summary, "wall_s": wall,
            "rounds": rows}


def per_client(rows: list[dict], key: str) -> float:
    """Mean bytes per client-round: every client asked, every round (catch-up downloads included)."""
    vals = [p[key] for r in rows for p in r["per_client"].values()]
    return sum(vals) / max(len(vals), 1)


# ------------------------------------------------------------------------------ the table
def load_results() -> dict[tuple[str, bool], list[dict]]:
    out: dict[tuple[str, bool], list[dict]] = {}
    for path in sorted(OUT.glob("*.json")):
        d = json.loads(path.read_text())
        out.setdefault((d["method"], d["dp"]), []).append(d)
    return out


def _fmt_bytes(b: float) -> str:
    return f"{b / 1e3:.1f} kB" if b < 1e6 else f"{b / 1e6:.2f} MB"


def _fmt_err(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1e}" if x < 1e-3 else f"{x:.3f}"


def report() -> str:
    res = load_results()
    lines = [("| method | client DP | seeds | accuracy, held-out passages (median) | accuracy, unseen roles | "
              "uplink per client-round | downlink per client-round | exactness error (median over rounds) | "
              "server time per round (median) | per seed (held-out) |"), "|---" * 10 + "|"]
    maj = [r["summary"]["majority_baseline"] for rs in res.values() for r in rs]
    maju = [r["summary"].get("majority_baseline_unseen") for rs in res.values() for r in rs]
    if maj:
        lines.append(f"| majority class | | | {statistics.median(maj):.3f} | {statistics.median(maju):.3f} | | | | | |")
    for dp in (False, True):
        for m, (label, _, private) in METHODS.items():
            runs = sorted(res.get((m, dp), []), key=lambda r: r["seed"])
            if not runs:
                if dp and isinstance(private, str) and private:
                    lines.append(f"| {label} | eps 3 | | {private} | | | | | | |")
                continue
            acc = statistics.median(r["summary"]["accuracy"] for r in runs)
            accu = statistics.median(r["summary"].get("accuracy_unseen", float("nan")) for r in runs)
            up = statistics.median(per_client(r["rounds"], "up") for r in runs)
            down = statistics.median(per_client(r["rounds"], "down") for r in runs)
            errs = [row["bench"]["exactness_error_rel"] for r in runs for row in r["rounds"]
                    if "exactness_error_rel" in row.get("bench", {})]
            srv = [row["bench"].get("configure_s", 0.0) + row["bench"].get("aggregate_s", 0.0) for r in runs
                   for row in r["rounds"] if "aggregate_s" in row.get("bench", {})]
            extra = ""
            trunc = [row["strategy"]["truncation_error_rel"] for r in runs for row in r["rounds"]
                     if "truncation_error_rel" in row["strategy"]]
            if trunc:
                extra = f" (clients restart from r_k truncations: {statistics.median(trunc):.3f} of it dropped)"
            seeds = ", ".join(f"{r['summary']['accuracy']:.3f}" for r in runs)
            lines.append(f"| {label} | {'eps 3' if dp else 'no'} | {len(runs)} | {acc:.3f} | {accu:.3f} | "
                         f"{_fmt_bytes(up)} | {_fmt_bytes(down)} | "
                         f"{_fmt_err(statistics.median(errs) if errs else None)}{extra} | "
                         f"{1e3 * statistics.median(srv):.1f} ms | {seeds} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("run", help="one run, saved to its result file")
    one.add_argument("--method", choices=list(METHODS), required=True)
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--dp", action="store_true", help="client DP at epsilon 3")
    for p in (one, q := sub.add_parser("queue", help="every run whose result file is missing")):
        p.add_argument("--rounds", type=int, default=25)
        p.add_argument("--clients-per-round", type=int, default=16)
        p.add_argument("--final-examples", type=int, default=1000)
        p.add_argument("--out", type=Path, default=None, help="result file (default: the run's file under "
                                                               f"{OUT.relative_to(REPO)})")
    q.add_argument("--jobs", type=int, default=2)
    q.add_argument("--methods", nargs="+", choices=list(METHODS), default=[m for m in METHODS if m not in PROBES])
    q.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    sub.add_parser("plan", help="print the runs and whether their results exist")
    sub.add_parser("report", help="print the table of the saved results")
    args = ap.parse_args()

    if args.cmd == "report":
        print(report())
        return 0
    if args.cmd == "plan":
        for m, dp, s in all_runs():
            path = result_path(m, dp, s)
            print(f"{'done   ' if path.exists() else 'missing'} {path.relative_to(REPO)}")
        return 0
    if args.cmd == "run":
        out = args.out or result_path(args.method, args.dp, args.seed)
        started = utc_now()
        res = run_one(args.method, args.seed, args.dp, args.rounds, args.clients_per_round, args.final_examples, [])
        write_json(out, {"started_utc": started, "command": command_line(), "machine": machine_facts(), **res})
        s = res["summary"]
        log(f"{args.method} dp={args.dp} seed {args.seed}: accuracy {s['accuracy']:.3f} / "
            f"{s.get('accuracy_unseen', float('nan')):.3f} in {res['wall_s']:.0f} s -> {out}")
        return 0
    # queue: each missing run in its own process, `jobs` at a time
    runs = all_runs() + [(m, False, s) for m in PROBES for s in SEEDS]
    todo = [(m, dp, s) for m, dp, s in runs
            if m in args.methods and s in args.seeds and not result_path(m, dp, s).exists()]
    running: list[tuple[subprocess.Popen, str]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        while todo or running:
            while todo and len(running) < args.jobs:
                m, dp, s = todo.pop(0)
                cmd = [sys.executable, __file__, "run", "--method", m, "--seed", str(s), "--rounds", str(args.rounds),
                       "--clients-per-round", str(args.clients_per_round), "--final-examples", str(args.final_examples),
                       *(["--dp"] if dp else [])]
                log(f"start {' '.join(cmd[2:])}")
                running.append((subprocess.Popen(cmd, cwd=REPO, env=env), f"{m} dp={dp} seed {s}"))
            time.sleep(2)
            for p, label in list(running):
                if p.poll() is not None:
                    running.remove((p, label))
                    if p.returncode != 0:
                        log(f"FAILED ({p.returncode}): {label}")
    finally:
        for p, _ in running:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
