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
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import measure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FEDADAPT = Path(sys.executable).parent / "fedadapt"
CENTRALIZED = ["data.partition=iid", "data.num_clients=1", "clients_per_round=1", "rounds=1",
               "train.local_steps=200", "train.batch_size=32", "train.optimizer=adamw", "train.lr=0.001",
               "train.lr_final=-1.0"]


def run(seed: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(FEDADAPT), "simulate", str(ROOT / "simulations/quickstart.toml"), "--out", out,
               "--set", f"seed={seed}"] + [a for o in overrides for a in ("--set", o)]
        r = measure(cmd, env={**os.environ}, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if r["rc"] != 0:
            sys.exit(f"failed (exit {r['rc']}): {' '.join(cmd)}")
        return {**json.loads((Path(out) / "summary.json").read_text()), "wall_s": r["wall_s"],
                "peak_rss_mb": r["peak_rss_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    results = {"federated": [run(s, []) for s in args.seeds], "centralized": [run(s, CENTRALIZED) for s in args.seeds]}
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    fed = results["federated"]
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}   (nproc={os.cpu_count()})")
    print(f"medians over seeds {args.seeds}; accuracy on 1000 held-out examples per set\n")
    print("| setting | held-out lines of training roles | roles never trained on | wall time of the command |")
    print("|---|---|---|---|")
    print(f"| majority class | {med(fed, 'majority_baseline'):.3f} | {med(fed, 'majority_baseline_unseen'):.3f} | - |")
    for name, rows in results.items():
        label = "federated quickstart (FedAvg, 246 role-clients)" if name == "federated" else "centralized LoRA (pooled data)"
        print(f"| {label} | {med(rows, 'accuracy'):.3f} | {med(rows, 'accuracy_unseen'):.3f} | {med(rows, 'wall_s'):.0f} s |")
    print("\nper seed (federated held-out / unseen): "
          + ", ".join(f"{s}: {r['accuracy']:.3f} / {r['accuracy_unseen']:.3f}" for s, r in zip(args.seeds, fed)))
    out = ROOT / "benchmarks/results/quickstart_accuracy.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"seeds": args.seeds, **results}, indent=2))


if __name__ == "__main__":
    main()
