"""A fedadapt scenario (the TOML `fedadapt simulate` runs) as a Flower ServerApp + ClientApp pair.

Both sides build the run from the same config exactly as the simulator does (runtime/setup.py), so a
Flower run and `fedadapt simulate` of one file start from the same model, partitions and seeds, and each
node runs its tasks through the same executor. Node `partition-id` k is the k-th client id in sorted order; the simulation
runtime must have as many SuperNodes as the scenario has clients.

Run config keys (`[tool.flwr.app.config]` or `flwr run ... -c`), each optional when a default is given:
  scenario = "path.toml"      the fedadapt scenario (relative paths: to the current directory)
  set      = "k=v; k2=v2"     overrides, as `fedadapt simulate --set` (e.g. "rounds=3; clients_per_round=5")
  out-dir  = "/abs/dir"       server only: write model.safetensors, metrics.jsonl, summary.json there
  fraction-evaluate = 0.0     share of clients also evaluated on their own data each round
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from fedadapt.core.config import load_config
from fedadapt.core.errors import ConfigError
from fedadapt.runtime import setup
from fedadapt.strategies.base import GlobalState

from .client import Participant, client_app
from .strategy import FedadaptStrategy, global_arrays

# Per process: one run (one model, one recipe, one executor), as in the simulator. Module level on purpose:
# Flower ships the ClientApp to its Ray actor pickled, and a closure's globals travel by value, so a cache
# referenced from `load` itself would start empty for every message.
_runs: dict[tuple, setup.Run] = {}


def _config_key(rc: dict, scenario: str | None, overrides: list[str]) -> tuple[str, tuple[str, ...]]:
    path = str(rc.get("scenario") or scenario or "")
    if not path:
        raise ConfigError("no fedadapt scenario: set run config 'scenario' (a TOML path)")
    extra = [s.strip() for s in str(rc.get("set", "")).split(";") if s.strip()]
    return path, (*overrides, *extra)


def load_run(run_config: dict, scenario: str | None = None, overrides: list[str] = ()) -> setup.Run:
    """The run named by `run_config` (else by the defaults), built once per process."""
    key = _config_key(run_config, scenario, list(overrides))
    if key not in _runs:
        cfg = load_config(key[0], list(key[1]))
        setup.check(cfg, "flower")  # attack, availability and privacy: refused, not ignored
        run = setup.load(cfg)
        # FedAU's "known" oracle, as the simulator sets it (every client always available)
        run.strategy.known_probabilities = {cid: min(cfg.clients_per_round, len(run.clients)) / len(run.clients)
                                            for cid in run.clients}
        _runs[key] = run
    return _runs[key]


def make_client_app(scenario: str | None = None, overrides: list[str] = ()) -> ClientApp:
    def load(context: Context) -> Participant:
        run = load_run(context.run_config, scenario, overrides)
        ids = sorted(run.clients)
        pid = int(context.node_config.get("partition-id", -1))
        if not 0 <= pid < len(ids):
            raise ConfigError(f"node partition-id {pid} outside the scenario's {len(ids)} clients")
        return Participant(ids[pid], run.executor, run.clients[ids[pid]])

    return client_app(load)


def make_server_app(scenario: str | None = None, overrides: list[str] = (), **defaults: Any) -> ServerApp:
    """`defaults`: run config values (e.g. `**{"out-dir": ...}`) used where the run config has none."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run(grid, {**defaults, **context.run_config}, scenario, overrides)

    return app


def run(grid: Grid, rc: dict, scenario: str | None = None, overrides: list[str] = ()) -> GlobalState:
    """The ServerApp's body: the scenario's strategy for its rounds on the nodes `grid` reaches."""
    t0 = time.perf_counter()
    r = load_run(rc, scenario, overrides)
    cfg = r.cfg
    out = Path(str(rc["out-dir"])) if rc.get("out-dir") else None
    rows = []

    def on_round(rec) -> None:
        rows.append(dataclasses.asdict(rec))
        if out is not None:
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("")
    fs = FedadaptStrategy(r.strategy, r.spec, num_rounds=cfg.rounds, min_nodes=len(r.clients),
                          min_results=cfg.coordinator.min_results,
                          evaluate=lambda s: r.evaluate(r.eval_subset, s), eval_every=cfg.eval.every,
                          fraction_evaluate=float(rc.get("fraction-evaluate", 0.0)),
                          eval_batch_size=cfg.eval.batch_size, seed=cfg.seed, on_round=on_round)
    train_start = time.perf_counter()
    fs.start(grid=grid, initial_arrays=global_arrays(fs.state), num_rounds=cfg.rounds,
             timeout=cfg.coordinator.round_timeout or 3600)
    state = fs.state
    if out is not None:
        save_file({k: v.contiguous() for k, v in state.tensors.items()}, str(out / "model.safetensors"))
        final = r.evaluate(r.test, state)
        summary = {"rounds": cfg.rounds, "clients": len(r.clients), "test_examples": len(r.test),
                   **{k: final[k] for k in ("accuracy", "loss", "perplexity") if k in final},  # the task's own
                   "train_seconds": time.perf_counter() - train_start, "total_seconds": time.perf_counter() - t0}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return state
