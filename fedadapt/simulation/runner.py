"""`fedadapt simulate`: run a scenario end to end, show progress, write the run directory.

The run directory receives metrics.jsonl (one JSON object per round), the resolved config.toml (so
`fedadapt simulate DIR/config.toml` reruns it), model.safetensors (the final global adapter state)
and summary.json (final metrics on the whole held-out data, and the majority-class baseline).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from pathlib import Path

import tomli_w
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from safetensors.torch import save_file

from fedadapt.core.config import RunConfig
from fedadapt.models.classifier import Features
from fedadapt.runtime import setup
from fedadapt.runtime.engine import RoundEngine, RoundRecord, Transport

from . import availability
from .attacks import choose_malicious, poison_data, with_attack
from .availability import AvailabilityTransport
from .transport import InProcessTransport

# Builds the transport the engine drives, from the run and its clients' data (with their attacks applied)
# and a callback per finished client; a context manager, closed when the run ends. The in-process one is
# the default; `fedadapt simulate --transport grpc` passes fedadapt.loopback's.
TransportFactory = Callable[[setup.Run, dict[str, Features], Callable[[str], None]], AbstractContextManager[Transport]]


def in_process(run: setup.Run, clients: dict[str, Features], on_client_done: Callable[[str], None]):
    return nullcontext(InProcessTransport(run.executor, clients, on_client_done))


def default_out_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"


def simulate(cfg: RunConfig, out_dir: Path, console: Console | None = None,
             transport: TransportFactory = in_process) -> dict:
    console = console or Console()
    t0 = time.perf_counter()
    setup.check(cfg, "simulate")  # refuse a bad strategy option or [privacy] combination before loading anything
    with console.status("loading data and model"):
        run = setup.load(cfg)
    strategy, spec = run.strategy, run.spec
    per_round = min(cfg.clients_per_round, len(run.clients))
    n_train = sum(len(f) for f in run.clients.values())
    malicious = choose_malicious(run.clients, cfg.attack, cfg.seed)
    clients = poison_data(run.clients, malicious, cfg.attack, run.task.train.num_classes)
    if malicious:
        console.print(f"attack {cfg.attack.kind}: {len(malicious)} of {len(run.clients)} clients are malicious")
    avail = availability.from_config(cfg.availability, cfg.seed, {cid: f.labels for cid, f in run.clients.items()},
                                     run.task.train.num_classes)
    # the oracle of FedAU's "known" weighting: P(available) x P(sampled)
    strategy.known_probabilities = {cid: avail.rate(cid) * per_round / len(run.clients) for cid in run.clients}
    if cfg.privacy.secure_aggregation:  # the key directory a coordinator would hold from client registration
        strategy.public_keys = {cid: run.recipe.public_key(cid) for cid in run.clients}
    if cfg.availability.pattern != "always":
        console.print(f"availability {cfg.availability.pattern}: mean p {sum(avail.p.values()) / len(avail.p):.3f}, "
                      f"min {min(avail.p.values()):.3f}, max {max(avail.p.values()):.3f}")
    console.print(f"[bold]{cfg.name}[/]: {len(run.clients)} clients ({n_train} training examples), "
                  f"{per_round} per round, {cfg.rounds} rounds, strategy {strategy.name}, "
                  f"{sum(v.numel() for v in spec.initial.values()):,} adapter parameters "
                  f"(setup {time.perf_counter() - t0:.1f}s)")

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.toml").write_text(tomli_w.dumps(_toml_ready(cfg.to_dict())))
    metrics_file = (out_dir / "metrics.jsonl").open("w")
    progress = Progress(TextColumn("round {task.fields[rnd]}/{task.fields[rounds]}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("clients"), TimeElapsedColumn(), console=console,
                        transient=True)
    bar = progress.add_task("train", total=per_round, rnd=1, rounds=cfg.rounds)

    def on_round(rec: RoundRecord) -> None:
        bad = len(malicious.intersection(rec.per_client))  # malicious clients that took part
        available = avail.count(rec.round)  # clients available this round; rec.clients took part
        metrics_file.write(json.dumps({**dataclasses.asdict(rec), "malicious": bad, "available": available}) + "\n")
        metrics_file.flush()
        acc = "" if rec.accuracy is None else f"  accuracy {rec.accuracy:.3f}"
        acc += "" if rec.perplexity is None else f"  perplexity {rec.perplexity:.2f}"
        loss = "" if rec.loss is None else f"  loss {rec.loss:.4f}"
        note = f"  [red]skipped: {rec.skipped}[/]" if rec.skipped else ""
        if rec.skipped and rec.rejected:  # say why, with the first client's reason
            cid = min(rec.rejected)
            note += f" [red]({len(rec.rejected)} rejected; {cid}: {rec.rejected[cid]})[/]"
        eps = rec.strategy.get("privacy/epsilon", rec.strategy.get("privacy/epsilon_max"))
        note += f"  epsilon {eps:.3f}" if eps is not None else ""  # the privacy ledger so far
        note += f"  malicious {bad}/{len(rec.per_client)}" if malicious else ""
        note += f"  available {available}, took part {len(rec.clients)}" if cfg.availability.pattern != "always" else ""
        console.print(f"round {rec.round:>3}/{cfg.rounds}{loss}{acc}  up {_mb(rec.bytes_up)}  "
                      f"down {_mb(rec.bytes_down)}  {rec.seconds:.1f}s{note}")
        progress.reset(bar, total=per_round, rnd=min(rec.round + 1, cfg.rounds), rounds=cfg.rounds)

    chat = run.task.kind == "causal-lm"
    # before any round (LoRA's B = 0): the base model, on the final test set and on the per-round subset
    base = {"test": run.evaluate_base(run.test), "subset": run.evaluate_base(run.eval_subset)} if chat else {}
    train_start = time.perf_counter()
    with transport(run, clients, lambda cid: progress.advance(bar)) as carrier, progress:
        c = cfg.coordinator
        if cfg.availability.pattern != "always":
            carrier = AvailabilityTransport(carrier, avail, offline=cfg.availability.absent == "offline")
        engine = RoundEngine(strategy, with_attack(carrier, cfg.attack, malicious, cfg.seed), spec,
                             min_results=c.min_results, round_timeout=c.round_timeout or None,
                             evaluate=lambda s: run.evaluate(run.eval_subset, s), eval_every=cfg.eval.every)
        state = engine.run(cfg.rounds, on_round)
    metrics_file.close()
    train_seconds = time.perf_counter() - train_start

    save_file({k: v.contiguous() for k, v in state.tensors.items()}, str(out_dir / "model.safetensors"))
    summary = {"rounds": cfg.rounds, "clients": len(run.clients)}
    summary.update(_final_chat(run, state, base, out_dir) if chat else _final_classification(run, state))
    summary.update(malicious_clients=len(malicious), train_seconds=train_seconds,
                   total_seconds=time.perf_counter() - t0)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (_print_chat_summary if chat else _print_summary)(console, summary, out_dir)
    return summary


def _final_classification(run: setup.Run, state) -> dict:
    final = run.evaluate(run.test, state)
    out = {"accuracy": final["accuracy"], "loss": final["loss"], "test_examples": len(run.test),
           "majority_baseline": _majority(run.clients, run.test.labels)}
    if run.test_unseen is not None:
        out["accuracy_unseen"] = run.evaluate(run.test_unseen, state)["accuracy"]
        out["test_unseen_examples"] = len(run.test_unseen)
        out["majority_baseline_unseen"] = _majority(run.clients, run.test_unseen.labels)
    return out


def _final_chat(run: setup.Run, state, base: dict, out_dir: Path) -> dict:
    """Held-out loss and perplexity next to the base model's, and greedy answers to held-out prompts (scored;
    the samples go to generations.jsonl)."""
    final = run.evaluate(run.test, state)
    out = {"loss": final["loss"], "perplexity": final["perplexity"], "token_accuracy": final["token_accuracy"],
           "base_loss": base["test"]["loss"], "base_perplexity": base["test"]["perplexity"],
           "base_perplexity_subset": base["subset"]["perplexity"],  # what the per-round perplexity starts from
           "test_examples": len(run.test), "test_tokens": final["tokens"]}
    if run.cfg.eval.generate > 0:
        scores, samples = run.generate(run.test, state)
        out.update(scores)
        with (out_dir / "generations.jsonl").open("w") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples)
    return out


def _majority(clients, test_labels: torch.Tensor) -> float:
    """Accuracy on `test_labels` of always predicting the most frequent training label."""
    train_labels = torch.cat([f.labels for f in clients.values()])
    majority = int(torch.bincount(train_labels).argmax())
    return float((test_labels == majority).float().mean())


def _print_summary(console: Console, s: dict, out_dir: Path) -> None:
    table = Table(title="final global model")
    table.add_column("test set")
    table.add_column("accuracy", justify="right")
    table.add_column("majority baseline", justify="right")
    table.add_row(f"held-out examples ({s['test_examples']})", f"{s['accuracy']:.3f}", f"{s['majority_baseline']:.3f}")
    if "accuracy_unseen" in s:
        table.add_row(f"clients never trained on ({s['test_unseen_examples']})", f"{s['accuracy_unseen']:.3f}",
                      f"{s['majority_baseline_unseen']:.3f}")
    console.print(table)
    _print_done(console, s, out_dir)


def _print_chat_summary(console: Console, s: dict, out_dir: Path) -> None:
    table = Table(title=f"final global model: held-out conversations ({s['test_examples']}, "
                        f"{s['test_tokens']:.0f} response tokens)")
    for column in ("model", "loss", "perplexity"):
        table.add_column(column, justify="right" if column != "model" else "left")
    table.add_row("base", f"{s['base_loss']:.3f}", f"{s['base_perplexity']:.2f}")
    table.add_row("federated", f"{s['loss']:.3f}", f"{s['perplexity']:.2f}")
    console.print(table)
    if "rouge_l" in s:
        console.print(f"greedy answers to {s['generated']:.0f} held-out prompts: ROUGE-L {s['rouge_l']:.3f}, "
                      f"exact match {s['exact_match']:.3f} (normalised {s['exact_match_normalized']:.3f}); "
                      f"samples in {out_dir}/generations.jsonl")
    _print_done(console, s, out_dir)


def _print_done(console: Console, s: dict, out_dir: Path) -> None:
    console.print(f"{s['rounds']} rounds in {s['train_seconds']:.0f}s (total {s['total_seconds']:.0f}s); "
                  f"results in {out_dir}/  (plot: fedadapt report {out_dir})")


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}MB"


def _toml_ready(d):
    """TOML has no null; the schema has none either, but be explicit about what is written."""
    return {k: _toml_ready(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}
