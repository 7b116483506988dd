"""FRL versus FedAvg versus coordinate-wise median with 0-30% malicious clients, and FRL on MiniLM adapters.

Part `digits` (simulations/frl-digits.toml): 50 clients (Dirichlet 1.0) of scikit-learn digits, 10 per
round, 30 rounds, an MLP 64-128-128-10 trained from scratch. FRL ranks the edges of the frozen random
network (supermask, keep 0.5); FedAvg and the median train the same MLP's weights (lr 0.1, otherwise
the same local training). Every strategy sees the same partition and the same malicious clients for a
seed. Attacks (each aggregator gets the model-poisoning attack it is designed to withstand):
  * model poisoning: FRL gets the collusive reverse-ranking attack; FedAvg and the median get sign-flipped
    updates scaled x10 (each malicious client sends g - 10 (u - g));
  * data poisoning: label flip (y -> 9 - y) for all three.
Part `minilm` (simulations/frl-minilm.toml, cut to 15 rounds x 8 clients for time; one seed, no attack):
does ranking frozen random LoRA factors of a pretrained model help? FRL on LoRA factors + head, FRL on
the head alone, and FedAvg of trained LoRA + head (the quickstart's settings) on the same task and rounds.
`--part report` prints the tables of the saved results again.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/frl_poisoning.py --seeds 0 1 2

The digits cohort can be changed for every strategy alike: --num-clients 100 --per-round 25
--min-examples 5 (the FRL paper's 25 clients per round; with 10 per round, 20% malicious clients are
half a round's votes often enough to decide the outcome), written to its own --out file:

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/frl_poisoning.py --part digits --num-clients 100 \
        --per-round 25 --min-examples 5 --out benchmarks/results/frl_poisoning_25of100.json --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from fedadapt.core.config import load_config
from fedadapt.core.errors import FedadaptError
from fedadapt.simulation.runner import simulate

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "simulations/frl-digits.toml"
MINILM = ROOT / "simulations/frl-minilm.toml"
FRACTIONS = [0.0, 0.1, 0.2, 0.3]
SCALE = 10.0
WEIGHTS = ["adapter.kind=full", "train.lr=0.1"]  # the same MLP, its weights trained
STRATEGIES = {  # name -> (overrides, its model-poisoning attack)
    "FRL": (["strategy.name=frl"], "reverse-ranking"),
    "FedAvg": (WEIGHTS + ["strategy.name=fedavg"], "sign-flip"),
    "Median": (WEIGHTS + ["strategy.name=median"], "sign-flip"),
}
MINILM_COMMON = ["rounds=15", "clients_per_round=8", "eval.every=100", "eval.final_max_examples=500"]  # for time
MINILM_RUNS = {  # name -> overrides of frl-minilm.toml
    "FRL, LoRA factors + head (rank 8)": [],
    "FRL, head only (rank 0)": ["adapter.rank=0"],
    "FedAvg, trained LoRA + head (rank 8)": ["adapter.kind=lora", "adapter.alpha=16", "strategy.name=fedavg",
                                             "train.lr=0.3", "train.lr_final=0.03", "train.momentum=0.0",
                                             "train.weight_decay=0.0", "train.local_steps=1"],
}


def run(path: Path, overrides: list[str]) -> dict:
    """One simulation; a run that stops with an error is recorded as diverged, with no accuracy. (A client
    whose weights become NaN/Inf no longer stops a run: its result is rejected and the round goes on; the
    global state itself becoming NaN/Inf, which the server cannot send, still does.)"""
    cfg = load_config(path, overrides)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        try:
            summary = simulate(cfg, Path(out), console=Console(quiet=True))
        except FedadaptError as exc:
            return {"overrides": overrides, "accuracy": None, "diverged": str(exc), "wall_s": time.perf_counter() - t0}
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    per_round = lambda k: statistics.mean(r[k] for r in rows)  # noqa: E731
    return {"overrides": overrides, "accuracy": summary["accuracy"], "wall_s": time.perf_counter() - t0,
            "bytes_up_per_round": per_round("bytes_up"), "bytes_down_per_round": per_round("bytes_down"),
            "bytes_up_per_client": statistics.mean(r["bytes_up"] / len(r["per_client"]) for r in rows),  # asked
            "malicious_per_round": [r["malicious"] for r in rows],
            "majority_baseline": summary["majority_baseline"]}


def digits(seeds: list[int], out: dict, save, cohort: list[str]) -> None:
    """Fills `out` (key -> one result per seed), saving after every run; runs already there are kept."""
    for name, (sets, model_attack) in STRATEGIES.items():
        for attack in (model_attack, "label-flip"):
            for f in FRACTIONS:
                if f == 0.0 and attack == "label-flip":
                    continue  # the same runs as 0% of the model attack
                key = f"{name}|{attack}|{f}"
                done = {r["seed"]: r for r in out.get(key, [])}
                out[key] = []
                for s in seeds:
                    extra = [f"seed={s}", f"attack.kind={attack if f else 'none'}", f"attack.fraction={f}",
                             f"attack.scale={SCALE}"]
                    r = done.get(s) or {"seed": s, **run(DIGITS, cohort + sets + extra)}
                    out[key].append(r)
                    save()
                    print(f"{key} seed {s}: {_acc(r['accuracy'])} ({r['wall_s']:.0f}s)", file=sys.stderr, flush=True)


def minilm(seed: int) -> dict:
    out = {}
    for name, sets in MINILM_RUNS.items():
        out[name] = run(MINILM, MINILM_COMMON + sets + [f"seed={seed}"])
        print(f"{name}: {_acc(out[name]['accuracy'])} ({out[name]['wall_s']:.0f}s)", file=sys.stderr, flush=True)
    return out


def _acc(a: float | None) -> str:
    return "diverged" if a is None else f"{a:.3f}"


def med(rows: list[dict], key: str = "accuracy") -> float:
    return statistics.median(r[key] for r in rows)


def report(res: dict) -> None:
    print(f"command: {' '.join(['.venv/bin/python', *sys.argv])}   (nproc={os.cpu_count()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    if "digits" in res:
        d, seeds = res["digits"], res["seeds"]
        n, k = res.get("num_clients", 50), res.get("per_round", 10)
        print(f"\ndigits, 30 rounds, {k} of {n} clients per round; final test accuracy, median over seeds {seeds} "
              "(min-max)\n")
        def acc(key: str) -> str:  # a diverged run ranks below every accuracy
            a = sorted((r["accuracy"] for r in d[key]), key=lambda x: -1.0 if x is None else x)
            lo, hi = a[(len(a) - 1) // 2], a[len(a) // 2]
            mid = None if lo is None or hi is None else (lo + hi) / 2
            return f"{_acc(mid)} ({_acc(a[0])}-{_acc(a[-1])})"

        print("| malicious clients | FRL, reverse-ranking | FedAvg, sign-flip x10 | Median, sign-flip x10 "
              "| FRL, label flip | FedAvg, label flip | Median, label flip |")
        print("|---|---|---|---|---|---|---|")
        for f in FRACTIONS:
            cells = [acc(f"{n}|{a}|{f}") for n, (_, a) in STRATEGIES.items()]
            cells += [acc(f"{n}|{'label-flip' if f else a}|{f}") for n, (_, a) in STRATEGIES.items()]
            print(f"| {f:.0%} | " + " | ".join(cells) + " |")
        print(f"\nbytes per round ({k} clients, attack-free runs, median over seeds)\n")
        print("| strategy | upload per client | upload per round | download per round |")
        print("|---|---|---|---|")
        for n, (_, a) in STRATEGIES.items():
            rows = d[f"{n}|{a}|0.0"]
            kb = [med(rows, k) / 1e3 for k in ("bytes_up_per_client", "bytes_up_per_round", "bytes_down_per_round")]
            print(f"| {n} | {kb[0]:.1f} kB | {kb[1]:.1f} kB | {kb[2]:.1f} kB |")
        mal = {f: statistics.mean(m for r in d[f"FRL|reverse-ranking|{f}"] for m in r["malicious_per_round"])
               for f in FRACTIONS}
        print(f"\nmalicious clients per round (mean, of {k}): " + ", ".join(f"{f:.0%}: {m:.1f}" for f, m in mal.items()))
        most = {f: max(m for r in d[f"FRL|reverse-ranking|{f}"] for m in r["malicious_per_round"]) for f in FRACTIONS}
        print(f"malicious clients per round (most, of {k}): " + ", ".join(f"{f:.0%}: {m}" for f, m in most.items()))
    if "minilm" in res:
        print(f"\nMiniLM extension, Shakespeare genre, 15 rounds x 8 of 246 role-clients, seed {res['minilm_seed']}, "
              "500 held-out passages of training roles, no attack\n")
        print("| setting | accuracy | upload per client | wall |")
        print("|---|---|---|---|")
        for name, r in res["minilm"].items():
            print(f"| {name} | {r['accuracy']:.3f} | {r['bytes_up_per_client'] / 1e3:.1f} kB | {r['wall_s']:.0f} s |")
        any_run = next(iter(res["minilm"].values()))
        print(f"| majority class | {any_run['majority_baseline']:.3f} | - | - |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--part", choices=["digits", "minilm", "all", "report"], default="all")
    ap.add_argument("--minilm-seed", type=int, default=0)
    ap.add_argument("--num-clients", type=int, default=50, help="digits: population (data.num_clients)")
    ap.add_argument("--per-round", type=int, default=10, help="digits: clients sampled per round")
    ap.add_argument("--min-examples", type=int, default=8, help="digits: data.min_examples of the partition")
    ap.add_argument("--out", default="benchmarks/results/frl_poisoning.json", help="results file (resumed)")
    args = ap.parse_args()
    path = ROOT / args.out
    res = json.loads(path.read_text()) if path.exists() else {}  # finished runs are kept (resume)
    path.parent.mkdir(exist_ok=True)

    def save() -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2))
        tmp.replace(path)

    if args.part in ("digits", "all"):
        if res.get("digits") and (res.get("num_clients", 50), res.get("per_round", 10)) != (args.num_clients,
                                                                                             args.per_round):
            sys.exit(f"{path} holds runs of another cohort; pass another --out")
        res.update(seeds=args.seeds, num_clients=args.num_clients, per_round=args.per_round,
                   min_examples=args.min_examples)
        digits(args.seeds, res.setdefault("digits", {}), save,
               [f"data.num_clients={args.num_clients}", f"clients_per_round={args.per_round}",
                f"data.min_examples={args.min_examples}"])
    if args.part in ("minilm", "all"):
        res.update(minilm_seed=args.minilm_seed, minilm=minilm(args.minilm_seed))
    save()
    report(res)


if __name__ == "__main__":
    main()
