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

--lr-decay R cosine-decays every method's client lr over the rounds to R x its own lr (FRL 0.4, FedAvg and
the median 0.1; the FRL reference decays its lr every round), --workers 2 runs two simulations at once:

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/frl_poisoning.py --part digits --num-clients 100 \
        --per-round 25 --min-examples 5 --lr-decay 0.1 --workers 2 \
        --out benchmarks/results/frl_poisoning_25of100_lrdecay.json --seeds 0 1 2 3 4

Part `analysis` instruments FRL's vote under 20% reverse-ranking (per round and layer: how far the attacked
vote's kept mask is from the vote had the colluders been honest, against how far an honest round moves it),
for each seed with a constant lr and, if --lr-decay is given, with the decayed one:

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/frl_poisoning.py --part analysis --num-clients 100 \
        --per-round 25 --min-examples 5 --lr-decay 0.1 --seeds 1 2 --out benchmarks/results/frl_attack_analysis.json
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

from harness import REPO, command_line, write_json
from rich.console import Console

from fedadapt.core.config import load_config
from fedadapt.core.errors import FedadaptError
from fedadapt.simulation.runner import simulate

DIGITS = REPO / "simulations/frl-digits.toml"
MINILM = REPO / "simulations/frl-minilm.toml"
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


def digits(seeds: list[int], out: dict, save, cohort: list[str], lr_decay: float = 0.0, workers: int = 1,
           fractions: list[float] = FRACTIONS, label_flip: bool = True) -> None:
    """Fills `out` (key -> one result per seed), saving after every run; runs already there are kept.
    `lr_decay` > 0 decays every method's client lr (cosine over the rounds) to lr_decay x its own lr.
    With `workers` > 1 the runs go to that many processes, the attack-free and 20% runs first."""
    jobs = []  # (key, seed, overrides)
    for name, (sets, model_attack) in STRATEGIES.items():
        lr = load_config(DIGITS, sets).train.lr  # the method's own client lr
        decay = [f"train.lr_final={lr_decay * lr:g}"] if lr_decay > 0 else []
        for attack in (model_attack, "label-flip") if label_flip else (model_attack,):
            for f in fractions:
                if f == 0.0 and attack == "label-flip":
                    continue  # the same runs as 0% of the model attack
                key = f"{name}|{attack}|{f}"
                for s in seeds:
                    extra = [f"seed={s}", f"attack.kind={attack if f else 'none'}", f"attack.fraction={f}",
                             f"attack.scale={SCALE}"]
                    jobs.append((key, s, cohort + sets + decay + extra))
    done = {(key, r["seed"]) for key, rows in out.items() for r in rows}
    todo = [j for j in jobs if (j[0], j[1]) not in done]
    # the goal's rows first (0% and 20% of the model attacks), then the other model-attack cells, label-flip last
    todo.sort(key=lambda j: ("label" in j[0], not (j[0].endswith("|0.0") or j[0].endswith("|0.2"))))

    def record(key: str, s: int, r: dict) -> None:
        rows = [x for x in out.get(key, []) if x["seed"] != s] + [{"seed": s, **r}]
        out[key] = sorted(rows, key=lambda x: seeds.index(x["seed"]) if x["seed"] in seeds else 1 << 30)
        save()
        print(f"{key} seed {s}: {_acc(r['accuracy'])} ({r['wall_s']:.0f}s)", file=sys.stderr, flush=True)

    if workers <= 1:
        for key, s, sets in todo:
            record(key, s, run(DIGITS, sets))
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed
    with ProcessPoolExecutor(workers) as pool:
        futures = {pool.submit(run, DIGITS, sets): (key, s) for key, s, sets in todo}
        for fut in as_completed(futures):
            record(*futures[fut], fut.result())


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


def attack_analysis(overrides: list[str]) -> dict:
    """One FRL run under reverse-ranking with the vote instrumented: per round and layer, how much the
    attacked vote's kept mask differs from the vote the same clients would have given had the colluders
    been honest ("clean": their honest rankings, which the attack computes anyway), from the honest-only
    vote, and how much the clean vote moved the mask from the previous global ranking (the round's
    progress). A mask difference is the fraction of the kept edges of one that the other does not keep."""
    from fedadapt.models.supermask import top_mask
    from fedadapt.simulation import attacks
    from fedadapt.simulation import runner as sim
    from fedadapt.strategies import frl

    cfg = load_config(DIGITS, overrides)
    malicious, colluders, rows = set(), [], []

    def choose(ids, attack, seed):
        malicious.update(choose_malicious(ids, attack, seed))
        return set(malicious)

    def reverse(honest):
        colluders.append(honest)
        return reverse_rankings(honest)

    def aggregate(self, rnd, results, state):
        honest = [r.tensors for r in results if r.client_id not in malicious]
        coll = colluders.pop() if colluders else []
        row = {"round": rnd, "clients": len(results), "malicious": len(results) - len(honest), "layers": {}}
        for name, old in state.tensors.items():
            mask = lambda rank: top_mask(rank, cfg.adapter.keep)  # noqa: E731
            diff = lambda a, b: float((mask(a) & ~mask(b)).sum() / mask(a).sum())  # noqa: E731
            attacked = frl.vote([r.tensors[name] for r in results])
            clean = frl.vote([h[name] for h in honest] + [c[name] for c in coll]) if coll else attacked
            row["layers"][name] = {"attacked_vs_clean": diff(attacked, clean),
                                   "attacked_vs_honest_only": diff(attacked, frl.vote([h[name] for h in honest])),
                                   "clean_step": diff(clean, old), "attacked_step": diff(attacked, old)}
        rows.append(row)
        return aggregate_(self, rnd, results, state)

    choose_malicious, reverse_rankings, aggregate_ = sim.choose_malicious, attacks.reverse_rankings, frl.FRL.aggregate
    sim.choose_malicious, attacks.reverse_rankings, frl.FRL.aggregate = choose, reverse, aggregate
    try:
        with tempfile.TemporaryDirectory() as out:
            summary = simulate(cfg, Path(out), console=Console(quiet=True))
            curve = [(r["round"], r["accuracy"]) for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text()
                                                               .splitlines()) if r.get("accuracy") is not None]
    finally:
        sim.choose_malicious, attacks.reverse_rankings = choose_malicious, reverse_rankings
        frl.FRL.aggregate = aggregate_
    return {"overrides": overrides, "accuracy": summary["accuracy"], "curve": curve, "rounds": rows}


def analysis_report(runs: dict) -> None:
    """Mean over rounds of the first layer's and all layers' mask differences, and by malicious count."""
    print("\n| run | final accuracy | kept-mask change, clean round | attacked vs clean | ratio | "
          "ratio by malicious clients in the round (first layer) |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        rounds = r["rounds"]
        cell = lambda key: statistics.mean(statistics.mean(x[key] for x in row["layers"].values())  # noqa: E731
                                           for row in rounds)
        first = next(iter(rounds[0]["layers"]))
        by_m: dict[int, list[float]] = {}
        for row in rounds:
            x = row["layers"][first]
            by_m.setdefault(row["malicious"], []).append(x["attacked_vs_clean"] / max(x["clean_step"], 1e-12))
        ratios = ", ".join(f"{m}: {statistics.mean(v):.2f}" for m, v in sorted(by_m.items()))
        step, att = cell("clean_step"), cell("attacked_vs_clean")
        print(f"| {name} | {r['accuracy']:.3f} | {step:.2%} | {att:.2%} | {att / step:.2f} | {ratios} |")


def report(res: dict) -> None:
    print(f"command: {command_line('.venv/bin/python')}   (nproc={os.cpu_count()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    if "digits" in res:
        d, seeds = res["digits"], res["seeds"]
        n, k = res.get("num_clients", 50), res.get("per_round", 10)
        decay = f", client lr cosine-decayed to {res['lr_decay']:g}x over the rounds" if res.get("lr_decay") else ""
        print(f"\ndigits, {res.get('rounds') or 30} rounds, {k} of {n} clients per round{decay}; final test accuracy, median over seeds "
              f"{seeds} (min-max)\n")
        def acc(key: str) -> str:  # a diverged run ranks below every accuracy
            if not d.get(key):
                return "not run"
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
        for n, (_, a) in STRATEGIES.items():  # each seed against its own attack-free run
            clean = {r["seed"]: r["accuracy"] for r in d.get(f"{n}|{a}|0.0", [])}
            for f in FRACTIONS[1:]:
                rows = [r for r in d.get(f"{n}|{a}|{f}", []) if r["seed"] in clean]
                pts = [None if r["accuracy"] is None or clean[r["seed"]] is None
                       else 100 * (r["accuracy"] - clean[r["seed"]]) for r in rows]
                if pts:
                    print(f"{n}, {a}, {f:.0%}, points vs the same seed's clean run: "
                          + ", ".join("diverged" if x is None else f"{x:+.1f}" for x in pts))
        print(f"\nbytes per round ({k} clients, attack-free runs, median over seeds)\n")
        print("| strategy | upload per client | upload per round | download per round |")
        print("|---|---|---|---|")
        for n, (_, a) in STRATEGIES.items():
            rows = d.get(f"{n}|{a}|0.0")
            if not rows:
                continue
            kb = [med(rows, k) / 1e3 for k in ("bytes_up_per_client", "bytes_up_per_round", "bytes_down_per_round")]
            print(f"| {n} | {kb[0]:.1f} kB | {kb[1]:.1f} kB | {kb[2]:.1f} kB |")
        ran = [f for f in FRACTIONS if d.get(f"FRL|reverse-ranking|{f}")]
        mal = {f: statistics.mean(m for r in d[f"FRL|reverse-ranking|{f}"] for m in r["malicious_per_round"])
               for f in ran}
        print(f"\nmalicious clients per round (mean, of {k}): " + ", ".join(f"{f:.0%}: {m:.1f}" for f, m in mal.items()))
        most = {f: max(m for r in d[f"FRL|reverse-ranking|{f}"] for m in r["malicious_per_round"]) for f in ran}
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
    ap.add_argument("--part", choices=["digits", "minilm", "all", "report", "analysis"], default="all")
    ap.add_argument("--minilm-seed", type=int, default=0)
    ap.add_argument("--num-clients", type=int, default=50, help="digits: population (data.num_clients)")
    ap.add_argument("--per-round", type=int, default=10, help="digits: clients sampled per round")
    ap.add_argument("--min-examples", type=int, default=8, help="digits: data.min_examples of the partition")
    ap.add_argument("--out", default="benchmarks/results/frl_poisoning.json", help="results file (resumed)")
    ap.add_argument("--lr-decay", type=float, default=0.0,
                    help="digits: cosine-decay every method's client lr over the rounds to this fraction of it; 0: off")
    ap.add_argument("--set", action="append", default=[], help="analysis: extra override (repeatable)")
    ap.add_argument("--workers", type=int, default=1, help="digits: runs in parallel processes")
    ap.add_argument("--rounds", type=int, default=0, help="digits: rounds (0: the scenario's 30)")
    ap.add_argument("--fractions", type=float, nargs="+", default=FRACTIONS, help="digits: malicious fractions")
    ap.add_argument("--no-label-flip", action="store_true", help="digits: only the model-poisoning attacks")
    args = ap.parse_args()
    path = REPO / args.out
    res = json.loads(path.read_text()) if path.exists() else {}  # finished runs are kept (resume)

    def save() -> None:
        write_json(path, res)

    if args.part == "analysis":  # per-round effect of reverse-ranking on FRL's vote, 20% malicious
        runs = json.loads(path.read_text()) if path.exists() else {}
        cohort = [f"data.num_clients={args.num_clients}", f"clients_per_round={args.per_round}",
                  f"data.min_examples={args.min_examples}", "attack.kind=reverse-ranking", "attack.fraction=0.2"]
        for s in args.seeds:
            for decay in sorted({0.0, args.lr_decay}):
                name = f"seed {s}, lr " + (f"cosine to {decay:g}x" if decay else "constant")
                if name not in runs:
                    extra = [f"train.lr_final={decay * load_config(DIGITS, []).train.lr:g}"] if decay else []
                    runs[name] = attack_analysis(cohort + extra + [f"seed={s}"] + args.set)
                    write_json(path, runs, indent=1)
                    print(f"{name}: {runs[name]['accuracy']:.3f}", file=sys.stderr, flush=True)
        analysis_report(runs)
        return
    if args.part in ("digits", "all"):
        setting = (args.num_clients, args.per_round, args.lr_decay, args.rounds)
        if res.get("digits") and (res.get("num_clients", 50), res.get("per_round", 10), res.get("lr_decay", 0.0),
                                  res.get("rounds", 0)) != setting:
            sys.exit(f"{path} holds runs of another cohort, lr schedule or length; pass another --out")
        res.update(seeds=args.seeds, num_clients=args.num_clients, per_round=args.per_round,
                   min_examples=args.min_examples, lr_decay=args.lr_decay, rounds=args.rounds)
        digits(args.seeds, res.setdefault("digits", {}), save,
               [f"data.num_clients={args.num_clients}", f"clients_per_round={args.per_round}",
                f"data.min_examples={args.min_examples}", *([f"rounds={args.rounds}"] if args.rounds else [])],
               args.lr_decay, args.workers, args.fractions, not args.no_label_flip)
    if args.part in ("minilm", "all"):
        res.update(minilm_seed=args.minilm_seed, minilm=minilm(args.minilm_seed))
    save()
    report(res)


if __name__ == "__main__":
    main()
