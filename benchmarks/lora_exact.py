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
    .venv/bin/python benchmarks/lora_exact.py --report a.json b.json   # one table of runs saved in two files
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import REPO, measure_simulate, write_json  # noqa: E402

HETERO = "[4, 8, 16]"
METHODS = {  # name -> (description, overrides)
    "fedavg": ("FedAvg-LoRA, naive A/B averaging (r=8 everywhere)", ['strategy={name="fedavg"}']),
    "zeropad": (f"FedAvg-LoRA, zero-padding (ranks {HETERO}, global r=16)",
                ["adapter.rank=16", "adapter.alpha=32.0", f'strategy={{name="zeropad", ranks={HETERO}}}']),
    "flora": (f"FLoRA stacking (ranks {HETERO})", [f'strategy={{name="flora", ranks={HETERO}}}']),
    "fedsb": ("Fed-SB (r=16; round 1 = init from 2 clients' gradients)",
              ["adapter.rank=16", 'strategy={name="fedsb", init_clients=2, init_samples=32}']),
    "fedsb_sign": ("Fed-SB (r=16; round 1 = init from 2 clients' gradient signs, 1 bit each)",
                   ["adapter.rank=16", 'strategy={name="fedsb", init_clients=2, init_samples=32, init_upload="sign"}']),
    "fedsb_vote": ("Fed-SB (r=16; round 1 = init from the sign votes of all the round's clients, 1 bit each)",
                   ["adapter.rank=16", 'strategy={name="fedsb", init_clients=0, init_samples=32, init_upload="sign"}']),
}


def run(seed: int, rounds: int, per_round: int, final: int, overrides: list[str]) -> dict:
    """One `fedadapt simulate` of the quickstart scenario with `overrides`; its accuracy, bytes and rounds."""
    with tempfile.TemporaryDirectory() as out:
        m = measure_simulate(REPO / "simulations/quickstart.toml", out,
                             [f"seed={seed}", f"rounds={rounds}", f"clients_per_round={per_round}",
                              f"eval.final_max_examples={final}", "eval.every=1000", *overrides])
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
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every method's run (e.g. train.lr=0.6), after the method's own")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/lora_exact.json")
    ap.add_argument("--report", type=Path, nargs="*",
                    help="print the table of saved results (default: --out; several files: their runs merged), run nothing")
    args = ap.parse_args()
    out = args.out
    if args.report is not None:
        return report(merged([json.loads(p.read_text()) for p in args.report or [out]]))
    results: dict = {"args": {**vars(args), "out": str(out)}, "methods": {}}
    for name in args.methods:
        desc, overrides = METHODS[name]
        results["methods"][name] = {"description": desc, "overrides": overrides, "runs": []}
    for seed in args.seeds:  # every method for a seed, then the next seed; results are saved as they come
        for name in args.methods:
            overrides = METHODS[name][1] + args.extra
            row = run(seed, args.rounds, args.clients_per_round, args.final_examples, overrides)
            results["methods"][name]["runs"].append({"seed": seed, **row})
            write_json(out, results)
            print(f"{name} seed {seed}: accuracy {row['accuracy']:.3f} / {row['accuracy_unseen']:.3f}, "
                  f"up {row['bytes_up'] / 1e6:.2f} MB, down {row['bytes_down'] / 1e6:.2f} MB", flush=True)
    report(results)


def merged(files: list[dict]) -> dict:
    """One result set from runs saved in several files (e.g. seeds run side by side); args of the first."""
    results = {"args": files[0]["args"], "methods": {}}
    for f in files:
        for name, m in f["methods"].items():
            results["methods"].setdefault(name, {**m, "runs": []})["runs"] += m["runs"]
    return results


def report(results: dict) -> None:
    """Medians per method over the seeds it finished, then every seed's accuracy next to FedAvg-LoRA's."""
    args = argparse.Namespace(**results["args"])
    methods = {k: m for k, m in results["methods"].items() if m["runs"]}  # a run cut short: what finished
    med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
    base = methods.get("fedavg")
    print(f"\n{args.rounds} rounds, {args.clients_per_round} roles per round; accuracy on {args.final_examples} "
          "held-out examples per set; medians over each method's seeds\n")
    print("| method | seeds | accuracy, held-out passages | accuracy, unseen roles | uplink total | of which init "
          "| uplink per client-round | downlink total | uplink vs FedAvg-LoRA (total / per client-round) |")
    print("|---|---|---|---|---|---|---|---|---|")
    every = [r for m in methods.values() for r in m["runs"]]
    print(f"| majority class | | {med(every, 'majority'):.3f} | {med(every, 'majority_unseen'):.3f} | | | | | |")
    for m in methods.values():
        runs = m["runs"]
        fewer = lambda k: med(base["runs"], k) / med(runs, k)  # noqa: B023, E731
        ratio = f"{fewer('bytes_up'):.1f}x fewer / {fewer('up_per_client_round'):.1f}x" if base else "-"
        print(f"| {m['description']} | {', '.join(str(r['seed']) for r in runs)} | {med(runs, 'accuracy'):.3f} | "
              f"{med(runs, 'accuracy_unseen'):.3f} | {med(runs, 'bytes_up') / 1e6:.2f} MB | "
              f"{med(runs, 'init_bytes_up') / 1e6:.2f} MB | {med(runs, 'up_per_client_round') / 1e3:.1f} kB | "
              f"{med(runs, 'bytes_down') / 1e6:.2f} MB | {ratio} |")
    seeds = sorted({r["seed"] for r in every})
    print("\nper seed, accuracy held-out passages / unseen roles (difference to FedAvg-LoRA's, in points)\n")
    print("| method | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|" + "---|" * len(seeds))
    ref = {r["seed"]: r for r in base["runs"]} if base else {}
    for m in methods.values():
        by_seed = {r["seed"]: r for r in m["runs"]}
        cells = []
        for s in seeds:
            r = by_seed.get(s)
            cell = "-" if r is None else f"{r['accuracy']:.3f} / {r['accuracy_unseen']:.3f}"
            if r is not None and s in ref and m is not base:
                cell += (f" ({100 * (r['accuracy'] - ref[s]['accuracy']):+.1f} / "
                         f"{100 * (r['accuracy_unseen'] - ref[s]['accuracy_unseen']):+.1f})")
            cells.append(cell)
        print(f"| {m['description']} | " + " | ".join(cells) + " |")
    if "flora" in methods:
        errs = [e for r in methods["flora"]["runs"] for e in r["exactness_error_rel"] if e is not None]
        print(f"\nFLoRA exactness_error_rel (||naive A/B average - exact|| / ||exact||, per round): "
              f"median {statistics.median(errs):.3f}, min {min(errs):.3f}, max {max(errs):.3f}")


if __name__ == "__main__":
    main()
