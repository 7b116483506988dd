"""Exact LoRA aggregation on the quickstart task: FedAvg-LoRA (naive A/B averaging), FedAvg-LoRA with
zero-padding for heterogeneous ranks, FLoRA (stacking, heterogeneous ranks) and Fed-SB.

Every method runs `simulations/quickstart.toml` (MiniLM, Shakespeare genre, one client per speaking
role) with the same seed, rounds, clients per round and local training; only [strategy] and the
adapter rank differ. Heterogeneous ranks are 4/8/16 cycled over the roles; Fed-SB's first round is
its federated LoRA-SB initialisation (gradients from `init_clients` roles), so it trains one round
less. Bytes are what the engine counted on the wire (safetensors payloads), summed over all rounds.

    .venv/bin/python benchmarks/lora_exact.py --seeds 0 1 2 --rounds 25 --clients-per-round 16   # quickstart size
    .venv/bin/python benchmarks/lora_exact.py --seeds 0 --rounds 10 --clients-per-round 8    # what BENCHMARKS.md shows
    .venv/bin/python benchmarks/lora_exact.py --report     # the table of benchmarks/results/lora_exact.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import measure

ROOT = Path(__file__).resolve().parent.parent
FEDADAPT = Path(sys.executable).parent / "fedadapt"
HETERO = "[4, 8, 16]"
METHODS = {  # name -> (description, overrides)
    "fedavg": ("FedAvg-LoRA, naive A/B averaging (r=8 everywhere)", ['strategy={name="fedavg"}']),
    "zeropad": (f"FedAvg-LoRA, zero-padding (ranks {HETERO}, global r=16)",
                ["adapter.rank=16", "adapter.alpha=32.0", f'strategy={{name="zeropad", ranks={HETERO}}}']),
    "flora": (f"FLoRA stacking (ranks {HETERO})", [f'strategy={{name="flora", ranks={HETERO}}}']),
    "fedsb": ("Fed-SB (r=16; round 1 = init from 2 clients' gradients)",
              ["adapter.rank=16", 'strategy={name="fedsb", init_clients=2, init_samples=32}']),
}


def run(seed: int, rounds: int, per_round: int, final: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(FEDADAPT), "simulate", str(ROOT / "simulations/quickstart.toml"), "--out", out]
        for o in [f"seed={seed}", f"rounds={rounds}", f"clients_per_round={per_round}",
                  f"eval.final_max_examples={final}", "eval.every=1000", *overrides]:
            cmd += ["--set", o]
        m = measure(cmd, env={**os.environ}, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if m["rc"] != 0:
            sys.exit(f"failed (exit {m['rc']}): {' '.join(cmd)}")
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((Path(out) / "summary.json").read_text())
    train_rows = [r for r in rows if "init_clients" not in r["strategy"]]
    return {
        "accuracy": summary["accuracy"], "accuracy_unseen": summary["accuracy_unseen"],
        "majority": summary["majority_baseline"], "majority_unseen": summary["majority_baseline_unseen"],
        "bytes_up": sum(r["bytes_up"] for r in rows), "bytes_down": sum(r["bytes_down"] for r in rows),
        "init_bytes_up": sum(r["bytes_up"] for r in rows if "init_clients" in r["strategy"]),
        "up_per_client_round": statistics.median(r["bytes_up"] / len(r["clients"]) for r in train_rows),
        "exactness_error_rel": [r["strategy"].get("exactness_error_rel") for r in rows],
        "wall_s": m["wall_s"],
        "rounds": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clients-per-round", type=int, default=8)
    ap.add_argument("--final-examples", type=int, default=500, help="per held-out set, for the final accuracy")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--report", action="store_true", help="print the table of the saved results, run nothing")
    args = ap.parse_args()
    out = ROOT / "benchmarks/results/lora_exact.json"
    if args.report:
        return report(json.loads(out.read_text()))
    results: dict = {"args": vars(args), "methods": {}}
    for name in args.methods:
        desc, overrides = METHODS[name]
        results["methods"][name] = {"description": desc, "overrides": overrides, "runs": []}
    for seed in args.seeds:  # every method for a seed, then the next seed; results are saved as they come
        for name in args.methods:
            overrides = METHODS[name][1]
            row = run(seed, args.rounds, args.clients_per_round, args.final_examples, overrides)
            results["methods"][name]["runs"].append({"seed": seed, **row})
            out.write_text(json.dumps(results, indent=2))
            print(f"{name} seed {seed}: accuracy {row['accuracy']:.3f} / {row['accuracy_unseen']:.3f}, "
                  f"up {row['bytes_up'] / 1e6:.2f} MB, down {row['bytes_down'] / 1e6:.2f} MB", flush=True)
    report(results)


def report(results: dict) -> None:
    args = argparse.Namespace(**results["args"])
    # a run cut short: report the seeds every method finished
    seeds = sorted(set.intersection(*({r["seed"] for r in m["runs"]} for m in results["methods"].values())))
    for m in results["methods"].values():
        m["runs"] = [r for r in m["runs"] if r["seed"] in seeds]
    med = lambda runs, k: statistics.median(r[k] for r in runs)
    base = results["methods"].get("fedavg")
    print(f"\nmedians over seeds {seeds}; {args.rounds} rounds, {args.clients_per_round} roles per round; "
          f"accuracy on {args.final_examples} held-out examples per set\n")
    print("| method | accuracy, held-out passages | accuracy, unseen roles | uplink total | of which init "
          "| uplink per client-round | downlink total | uplink vs FedAvg-LoRA (total / per client-round) |")
    print("|---|---|---|---|---|---|---|---|")
    runs0 = next(iter(results["methods"].values()))["runs"]
    print(f"| majority class | {med(runs0, 'majority'):.3f} | {med(runs0, 'majority_unseen'):.3f} | | | | | |")
    for m in results["methods"].values():
        runs = m["runs"]
        fewer = lambda k: med(base["runs"], k) / med(runs, k)  # noqa: B023
        ratio = f"{fewer('bytes_up'):.1f}x fewer / {fewer('up_per_client_round'):.1f}x" if base else "-"
        print(f"| {m['description']} | {med(runs, 'accuracy'):.3f} | {med(runs, 'accuracy_unseen'):.3f} | "
              f"{med(runs, 'bytes_up') / 1e6:.2f} MB | {med(runs, 'init_bytes_up') / 1e6:.2f} MB | "
              f"{med(runs, 'up_per_client_round') / 1e3:.1f} kB | {med(runs, 'bytes_down') / 1e6:.2f} MB | {ratio} |")
    if "flora" in results["methods"]:
        errs = [e for r in results["methods"]["flora"]["runs"] for e in r["exactness_error_rel"] if e is not None]
        print(f"\nFLoRA exactness_error_rel (||naive A/B average - exact|| / ||exact||, per round): "
              f"median {statistics.median(errs):.3f}, min {min(errs):.3f}, max {max(errs):.3f}")


if __name__ == "__main__":
    main()
