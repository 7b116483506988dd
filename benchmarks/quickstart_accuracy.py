"""Quickstart accuracy and time: federated (the scenario as shipped) versus centralized LoRA.

Centralized = the same model, LoRA and held-out sets, with all training data pooled on one client
and the same number of training examples processed (25 rounds x 16 clients x 16 = 6400 = 200 steps
x 32), trained with AdamW 1e-3 (the best centralized setting in QUICKSTART-NOTES.md). The split
(held-out lines of training roles; roles never trained on) depends on the seed, so both are run per
seed. Majority = always predicting the most frequent training label.

    .venv/bin/python benchmarks/quickstart_accuracy.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import REPO, command_line, measure_simulate, write_json  # noqa: E402

CENTRALIZED = ["data.partition=iid", "data.num_clients=1", "clients_per_round=1", "rounds=1",
               "train.local_steps=200", "train.batch_size=32", "train.optimizer=adamw", "train.lr=0.001",
               "train.lr_final=-1.0"]


def run(seed: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        r = measure_simulate(REPO / "simulations/quickstart.toml", out, [f"seed={seed}", *overrides])
        return {**json.loads((Path(out) / "summary.json").read_text()), "wall_s": r["wall_s"],
                "peak_rss_mb": r["peak_rss_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    results = {"federated": [run(s, []) for s in args.seeds], "centralized": [run(s, CENTRALIZED) for s in args.seeds]}
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    fed = results["federated"]
    print(f"command: {command_line(Path(sys.executable).name)}   (nproc={os.cpu_count()})")
    print(f"medians over seeds {args.seeds}; accuracy on 1000 held-out examples per set\n")
    print("| setting | held-out lines of training roles | roles never trained on | wall time of the command |")
    print("|---|---|---|---|")
    print(f"| majority class | {med(fed, 'majority_baseline'):.3f} | {med(fed, 'majority_baseline_unseen'):.3f} | - |")
    for name, rows in results.items():
        label = "federated quickstart (FedAvg, 246 role-clients)" if name == "federated" else "centralized LoRA (pooled data)"
        print(f"| {label} | {med(rows, 'accuracy'):.3f} | {med(rows, 'accuracy_unseen'):.3f} | {med(rows, 'wall_s'):.0f} s |")
    print("\nper seed (federated held-out / unseen): "
          + ", ".join(f"{s}: {r['accuracy']:.3f} / {r['accuracy_unseen']:.3f}" for s, r in zip(args.seeds, fed)))
    write_json(REPO / "benchmarks/results/quickstart_accuracy.json", {"seeds": args.seeds, **results})


if __name__ == "__main__":
    main()
