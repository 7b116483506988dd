"""Shared-randomness strategies (Ferret, shared-seed zeroth-order) against FedAvg: bytes, accuracy, RNG speed.

Three parts, each writing benchmarks/results/shared_seed_<part>.json:

* `throughput`: parameters regenerated per second by the strategies' seeded generators (core.rng: a
  fresh CPU generator per seed, fp32) and by a ZO `rebuild` (per seed: regenerate z, accumulate into
  fp64 theta), against a plain `torch.randn(d, out=buf)` fill of the same size, as a ratio.
* `charlm`: next-character prediction on the Shakespeare roles (a short context of one role's
  speech -> the next character; one client per role) with the built-in tiny Llama (2 layers, every
  parameter tuned). The data layer has no language-model task, so the examples are written as a
  JSONL classification file (text = context, label = next character, group = role) that the ordinary
  file loader reads: the tiny causal LM's decoder stack with a character head.
* `quickstart`: the quickstart task (MiniLM + LoRA, Shakespeare genre, one client per role), at a
  reduced scale given on the command line (MiniLM forward passes are what zeroth-order steps cost).

Every run goes through the ordinary simulator (engine, codec, contracts), so bytes up/down per client
per round are the encoded payloads the engine counted (metrics.jsonl `per_client`).

    nice -n 10 .venv/bin/python benchmarks/shared_seed.py throughput
    nice -n 10 .venv/bin/python benchmarks/shared_seed.py charlm
    nice -n 10 .venv/bin/python benchmarks/shared_seed.py quickstart --rounds 3 --clients 4
    .venv/bin/python benchmarks/shared_seed.py report      # the tables of BENCHMARKS.md
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

import torch
from harness import REPO, RESULTS, command_line, write_json
from rich.console import Console

WORK = Path(tempfile.mkdtemp(prefix="shared_seed-"))  # run directories and the generated data file
CHARS = "abcdefghijklmnopqrstuvwxyz ,.;:!?'"


# ---------------------------------------------------------------------------------------- throughput
def best_rates(fns: dict, numel: dict, repeat: int) -> dict:
    """Parameters per second of each function: best of `repeat` rounds, the functions interleaved within a
    round so that a change of the machine's load hits all of them alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: numel[name] / best[name] for name in fns}


def throughput(args) -> dict:
    from fedadapt.strategies.ferret import base
    from fedadapt.strategies.seeded import fill_normal, pool_seeds
    from fedadapt.strategies.zo import rebuild

    rows = []
    for d in args.sizes:
        buf = torch.empty(d)
        g = torch.Generator().manual_seed(0)
        seeds = pool_seeds(1, args.seeds)
        theta0 = {"w": torch.zeros(d)}
        acc = torch.ones(args.seeds, dtype=torch.float64)
        fns = {
            "plain": lambda: torch.randn(d, out=buf, generator=g),
            # a fresh generator per seed (core.rng), then the fill: what a ZO step does
            "zo_perturbation": lambda: fill_normal(seeds[0], buf),
            "ferret_gaussian_base": lambda: base(seeds[0], 0, d, "gaussian"),
            "ferret_truncnormal_base": lambda: base(seeds[0], 0, d, "truncnormal"),
            # per seed: regenerate z_s and accumulate it into fp64 theta (what a client and the server do)
            "zo_rebuild_per_seed": lambda: rebuild(theta0, ["w"], acc, seeds),
        }
        rates = best_rates(fns, {n: d * (args.seeds if n == "zo_rebuild_per_seed" else 1) for n in fns}, args.repeat)
        plain = rates.pop("plain")
        rows.append({"numel": d, "torch_randn_per_s": plain,
                     **{f"{k}_per_s": v for k, v in rates.items()},
                     **{f"{k}_ratio": v / plain for k, v in rates.items()}})
        print(f"d={d:>10,}  torch.randn {plain / 1e6:8.1f} M/s  " +
              "  ".join(f"{k} {v / 1e6:.1f} M/s ({v / plain:.2f}x)" for k, v in rates.items()))
    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}


# ---------------------------------------------------------------------------------------- simulations
def simulate(config: Path | None, overrides: list[str], tag: str) -> dict:
    from fedadapt.core.config import load_config
    from fedadapt.simulation.runner import simulate as run

    cfg = load_config(config, overrides)
    out = WORK / tag
    t = time.perf_counter()
    summary = run(cfg, out, Console(quiet=True))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per = [c for r in records for c in r["per_client"].values() if c["status"] == "accepted"]
    return {
        "accuracy": summary["accuracy"], "loss": summary["loss"], "majority": summary["majority_baseline"],
        "accuracy_unseen": summary.get("accuracy_unseen"),
        "bytes_up_per_client_round": statistics.mean(c["up"] for c in per),
        "bytes_down_per_client_round": statistics.mean(c["down"] for c in per),
        "bytes_down_max": max(c["down"] for c in per),
        "rejected": sum(len(r["rejected"]) for r in records),
        "curve": [r["accuracy"] for r in records],
        "wall_s": time.perf_counter() - t,
        "overrides": overrides,
    }


def charlm_file(path: Path, roles: int, per_role: int, context: int) -> Path:
    """Next-character examples of the `roles` roles with the most lines, `per_role` each."""
    from fedadapt.data.shakespeare import load_corpus

    corpus = load_corpus()
    ranked = sorted(((len(lines), f"{play}/{role}", lines) for play, rs in corpus.items()
                     for role, lines in rs.items()), reverse=True)[:roles]
    with path.open("w") as f:
        for _, who, lines in ranked:
            text = " ".join(" ".join(lines).lower().split())
            n = 0
            for i in range(context, len(text), 7):
                if text[i] in CHARS:
                    f.write(json.dumps({"text": text[i - context : i], "label": text[i] if text[i] != " " else "space",
                                        "who": who}) + "\n")
                    n += 1
                    if n == per_role:
                        break
    return path


def charlm_overrides(data: Path, rounds: int, clients: int, context: int) -> list[str]:
    return [f'data.dataset="{data}"', 'data.group_field="who"', 'data.partition="natural"', "data.test_fraction=0.2",
            'model.source="tiny-llama"', f"model.max_length={context + 1}", 'adapter.kind="full"', f"rounds={rounds}",
            f"clients_per_round={clients}", "train.batch_size=16", "eval.every=5", "eval.max_examples=400",
            "eval.final_max_examples=2000", 'name="charlm"', "seed=0"]


def strategy_overrides(name: str, a) -> list[str]:
    """FedAvg and Ferret: the same local first-order steps and lr. ZO: `name` is zo@<its step size>."""
    if name == "fedavg":
        return ['strategy={name="fedavg"}', f"train.lr={a.lr}", f"train.local_steps={a.local_steps}"]
    if name == "ferret":
        return [f'strategy={{name="ferret", seeds={a.ferret_seeds}}}', f"train.lr={a.lr}",
                f"train.local_steps={a.local_steps}"]
    lr = float(name.split("@")[1])
    return [f'strategy={{name="zo", seeds=1024, steps={a.zo_steps}, eps={a.zo_eps}}}', f"train.lr={lr}",
            "train.lr_final=-1.0"]  # a constant step size


def compare(args, config: Path | None, base: list[str], tag: str) -> dict:
    names = [n for n in args.strategies if n != "zo"]
    names += [f"zo@{lr:g}" for lr in args.zo_lr] if "zo" in args.strategies else []
    out = {}
    for name in names:
        r = simulate(config, base + strategy_overrides(name, args), f"{tag}-{name}")
        out[name] = r
        print(f"{tag} {name:9s} accuracy {r['accuracy']:.3f} (majority {r['majority']:.3f})  "
              f"up {r['bytes_up_per_client_round']:,.0f} B  down {r['bytes_down_per_client_round']:,.0f} B "
              f"per client per round  rejected {r['rejected']}  {r['wall_s']:.0f}s", flush=True)
    return out


def charlm(args) -> dict:
    data = charlm_file(WORK / "charlm.jsonl", args.roles, args.per_role, args.context)
    base = charlm_overrides(data, args.rounds, args.clients, args.context)
    return {"task": f"next character after {args.context}, {args.roles} roles x {args.per_role} examples, "
                    "tiny Llama (full)",
            "rounds": args.rounds, "clients_per_round": args.clients, "runs": compare(args, None, base, "charlm")}


def quickstart(args) -> dict:
    base = [f"rounds={args.rounds}", f"clients_per_round={args.clients}", "eval.every=1000",
            "eval.max_examples=100", f"eval.final_max_examples={args.eval_examples}"]
    return {"task": "quickstart (MiniLM + LoRA r=8, genre)", "rounds": args.rounds, "clients_per_round": args.clients,
            "runs": compare(args, REPO / "simulations" / "quickstart.toml", base, "quickstart")}


def report(args) -> None:
    """Markdown tables from the results files (what BENCHMARKS.md shows)."""
    for path in sorted(RESULTS.glob("shared_seed_*.json")):
        r = json.loads(path.read_text())
        print(f"\n{path.name}: `{r['command']}`")
        if "rows" in r:
            print("\n| parameters | torch.randn fill | ZO perturbation | Ferret base (gaussian) | Ferret base (truncnormal)"
                  " | ZO rebuild (per seed, with fp64 accumulation) |\n|---|---|---|---|---|---|")
            for row in r["rows"]:
                cells = [f"{row[k + '_per_s'] / 1e6:.0f} M/s ({row[k + '_ratio']:.2f}x)" for k in
                         ("zo_perturbation", "ferret_gaussian_base", "ferret_truncnormal_base", "zo_rebuild_per_seed")]
                print(f"| {row['numel']:,} | {row['torch_randn_per_s'] / 1e6:.0f} M/s | " + " | ".join(cells) + " |")
            continue
        print(f"\n{r['task']}, {r['rounds']} rounds of {r['clients_per_round']} clients\n")
        print("| strategy | test accuracy | (unseen roles) | test loss | majority class | bytes up per client-round"
              " | bytes down per client-round (max) | up+down | rejected uploads |\n|---|---|---|---|---|---|---|---|---|")
        for name, x in r["runs"].items():
            total = x["bytes_up_per_client_round"] + x["bytes_down_per_client_round"]
            unseen = "-" if x.get("accuracy_unseen") is None else f"{x['accuracy_unseen']:.3f}"
            print(f"| {name} | {x['accuracy']:.3f} | {unseen} | {x['loss']:.3f} | {x['majority']:.3f} | "
                  f"{x['bytes_up_per_client_round']:,.0f} | {x['bytes_down_per_client_round']:,.0f} "
                  f"({x['bytes_down_max']:,}) | {total:,.0f} | {x['rejected']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=["throughput", "charlm", "quickstart", "report"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    ap.add_argument("--seeds", type=int, default=16, help="throughput: seeds per rebuild")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--strategies", nargs="+", default=["fedavg", "ferret", "zo"])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--roles", type=int, default=24)
    ap.add_argument("--per-role", type=int, default=200)
    ap.add_argument("--context", type=int, default=4, help="charlm: characters of context (the classifier mean-pools)")
    ap.add_argument("--lr", type=float, default=0.3, help="FedAvg/Ferret local SGD lr")
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--ferret-seeds", type=int, default=200)
    ap.add_argument("--zo-steps", type=int, default=200)
    ap.add_argument("--zo-lr", type=float, nargs="+", default=[1e-3, 3e-3], help="ZO step sizes (each a run)")
    ap.add_argument("--zo-eps", type=float, default=1e-3)
    ap.add_argument("--eval-examples", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "report":
        return report(args)
    result = {"throughput": throughput, "charlm": charlm, "quickstart": quickstart}[args.part](args)
    result["command"] = command_line(Path(sys.executable).name)
    result["nproc"] = os.cpu_count()
    result["load_avg_at_end"] = os.getloadavg()[0]
    out = args.out or RESULTS / f"shared_seed_{args.part}.json"
    write_json(out, result)
    print(f"written {out}")


if __name__ == "__main__":
    main()
