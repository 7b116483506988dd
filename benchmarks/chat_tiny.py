"""Held-out perplexity of the chat demo (simulations/chat-tiny.toml): the base model, local-only models, the
federated model and a centralized one, on the same held-out conversations of the roles that trained.

    .venv/bin/python benchmarks/chat_tiny.py --seeds 0 1 2 [--set strategy.name=fedsb ...]
    .venv/bin/python benchmarks/chat_tiny.py --report benchmarks/results/chat_tiny.json
    .venv/bin/python benchmarks/chat_tiny.py --strategies fedavg fedau ... --rounds 4   # every strategy by name

- base: the pretrained demo LM, no fine-tuning.
- local-only: every role fine-tunes its own LoRA on its own conversations, for as many local steps as it
  would take in the federation if it were asked every round (rounds x local_steps); each is evaluated on its
  own role's held-out conversations.
- federated: `fedadapt simulate` of the scenario (its global model).
- centralized: one LoRA on the pooled conversations, as many examples processed as the federation's
  (rounds x clients_per_round x local_steps steps of the same batch size).
Every loss is per response token over the whole held-out set (every conversation of every role), so the four
numbers are comparable; perplexity = exp(loss). Medians over the seeds. Threads: 1 (torch.set_num_threads).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import REPO, RESULTS, machine_facts, write_json
from rich.console import Console
from safetensors.torch import load_file

from fedadapt.core.config import load_config
from fedadapt.runtime import setup
from fedadapt.simulation.runner import simulate
from fedadapt.strategies.base import Task
from fedadapt.training.loop import evaluate, train_local

SCENARIO = REPO / "simulations" / "chat-tiny.toml"


def held_out_by_role(run: setup.Run) -> dict[str, object]:
    """Each role's held-out conversations, tokenized (roles with none are left out)."""
    groups = run.task.test.groups or []
    by_role: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_role.setdefault(g, []).append(i)
    return {g: setup.featurize(run.loaded, run.task.test.subset(idx)) for g, idx in by_role.items() if g in run.clients}


def pooled(metrics: list[dict]) -> dict[str, float]:
    """Per-token loss over several sets (each a dict with loss and tokens) and its perplexity."""
    tokens = sum(m["tokens"] for m in metrics)
    loss = sum(m["loss"] * m["tokens"] for m in metrics) / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}


def fresh(run: setup.Run) -> None:
    """The model's adapter back at its initial state (LoRA B = 0: the base model)."""
    params = dict(run.model.named_parameters())
    with torch.no_grad():
        for name, t in run.spec.initial.items():
            params[name].copy_(t)


def one_seed(seed: int, overrides: list[str], console: Console) -> dict:
    cfg = load_config(SCENARIO, [f"seed={seed}", *overrides])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        summary = simulate(cfg, Path(tmp) / "run", console=console)
        federated_state = load_file(str(Path(tmp) / "run" / "model.safetensors"))
    federated_seconds = time.perf_counter() - start
    run = setup.load(cfg)
    tests = held_out_by_role(run)
    bs = cfg.eval.batch_size
    out = {"seed": seed, "roles": len(tests), "federated_seconds": federated_seconds, "summary": summary}
    fresh(run)
    out["base"] = pooled([evaluate(run.model, t, bs) for t in tests.values()])
    run.executor.recipe.prepare(run.model, Task("evaluate", cfg.rounds, {}, federated_state))
    out["federated"] = pooled([evaluate(run.model, t, bs) for t in tests.values()])
    steps = cfg.rounds * cfg.train.local_steps
    local = []
    for role, test in tests.items():  # one LoRA per role, its own data only
        fresh(run)
        train_local(run.model, run.clients[role], dataclasses.replace(cfg.train, local_steps=steps), seed)
        local.append(evaluate(run.model, test, bs))
    out["local_only"] = pooled(local)
    fresh(run)
    everyone = setup.featurize(run.loaded, run.task.train)
    central = dataclasses.replace(cfg.train, local_steps=cfg.rounds * min(cfg.clients_per_round, len(run.clients))
                                  * cfg.train.local_steps)
    train_local(run.model, everyone, central, seed)
    out["centralized"] = pooled([evaluate(run.model, t, bs) for t in tests.values()])
    out["steps"] = {"local_only_per_role": steps, "centralized": central.local_steps}
    return out


def by_strategy(names: list[str], rounds: int, seed: int, console: Console) -> list[dict]:
    """`--set strategy.name=NAME` on the scenario as it ships (its other settings, each strategy's own
    defaults), `rounds` rounds: the global model's held-out perplexity against the base's on the same subset."""
    out = []
    for name in names:
        cfg = load_config(SCENARIO, [f"seed={seed}", f"strategy.name={name}", f"rounds={rounds}",
                                     f"eval.every={rounds}", "eval.generate=0"])
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            s = simulate(cfg, Path(tmp) / "run", console=console)
        out.append({"strategy": name, "rounds": rounds, "seconds": time.perf_counter() - start,
                    "perplexity": s["perplexity"], "base_perplexity": s["base_perplexity"]})
    return out


def strategy_table(rows: list[dict]) -> str:
    lines = ["| strategy | held-out perplexity | base | change | wall (s) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['perplexity']:.2f} | {r['base_perplexity']:.2f} | "
                     f"{100 * (r['perplexity'] / r['base_perplexity'] - 1):+.1f}% | {r['seconds']:.0f} |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    rows = ["| model | held-out perplexity (median) | per seed | loss (median) |", "|---|---|---|---|"]
    for key, label in (("base", "base (pretrained, no fine-tuning)"), ("local_only", "local-only (each role alone)"),
                       ("federated", "**federated**"), ("centralized", "centralized (pooled data)")):
        ppl = [r[key]["perplexity"] for r in results]
        loss = [r[key]["loss"] for r in results]
        rows.append(f"| {label} | {statistics.median(ppl):.2f} | {', '.join(f'{p:.2f}' for p in ppl)} | "
                    f"{statistics.median(loss):.4f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", type=Path, default=RESULTS / "chat_tiny.json")
    ap.add_argument("--report", type=Path, help="print the table of an earlier --json file and exit")
    ap.add_argument("--strategies", nargs="+", help="instead: each strategy by name, --rounds rounds, --seeds[0]")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args(argv)
    if args.report:
        import json

        data = json.loads(args.report.read_text())
        print(strategy_table(data["strategies"]) if "strategies" in data else table(data["results"]))
        return 0
    torch.set_num_threads(1)
    console = Console(stderr=True)
    if args.strategies:
        rows = by_strategy(args.strategies, args.rounds, args.seeds[0], console)
        path = args.json if args.json != RESULTS / "chat_tiny.json" else RESULTS / "chat_tiny_strategies.json"
        write_json(path, {"machine": machine_facts(), "threads": 1, "command": " ".join(sys.argv), "strategies": rows})
        print(strategy_table(rows), flush=True)
        return 0
    results = []
    for seed in args.seeds:
        results.append(one_seed(seed, args.overrides, console))
        write_json(args.json, {"machine": machine_facts(), "threads": 1, "overrides": args.overrides,
                               "command": " ".join(sys.argv), "results": results})
        print(table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
