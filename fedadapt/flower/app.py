"""A fedadapt scenario (the TOML `fedadapt simulate` runs) as a Flower ServerApp + ClientApp pair.

Both sides build the scenario from the same config exactly as the simulator does (`build_scenario`,
`strategies.base.build`), so a Flower run and `fedadapt simulate` of one file start from the same model,
partitions and seeds. Node `partition-id` k is the k-th client id in sorted order; the simulation
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

from fedadapt.core.config import RunConfig, load_config
from fedadapt.core.errors import ConfigError
from fedadapt.simulation.scenario import Scenario, build_scenario
from fedadapt.strategies.base import GlobalState, ModelSpec, RunSettings, Task, build, recipe_for

from .client import Participant, client_app
from .strategy import FedadaptStrategy, global_arrays

_scenarios: dict[tuple, tuple[RunConfig, Scenario]] = {}  # per process: one scenario, one model, as in the simulator
_recipes: dict[str, Any] = {}


def _config_key(rc: dict, scenario: str | None, overrides: list[str]) -> tuple[str, tuple[str, ...]]:
    path = str(rc.get("scenario") or scenario or "")
    if not path:
        raise ConfigError("no fedadapt scenario: set run config 'scenario' (a TOML path)")
    extra = [s.strip() for s in str(rc.get("set", "")).split(";") if s.strip()]
    return path, (*overrides, *extra)


def load_scenario(run_config: dict, scenario: str | None = None, overrides: list[str] = ()
                  ) -> tuple[RunConfig, Scenario]:
    """The scenario named by `run_config` (else by the defaults), built once per process."""
    key = _config_key(run_config, scenario, list(overrides))
    if key not in _scenarios:
        cfg = load_config(key[0], list(key[1]))
        _supported(cfg)
        _scenarios[key] = (cfg, build_scenario(cfg))
    return _scenarios[key]


def _supported(cfg: RunConfig) -> None:
    """What the simulator adds around the engine and this adapter does not (yet): refuse, don't ignore."""
    if cfg.attack.kind != "none" or cfg.availability.pattern != "always":
        raise ConfigError("attack and availability simulation are fedadapt-simulator features; not through Flower")
    privacy = getattr(cfg, "privacy", None)
    if privacy is not None and (getattr(privacy, "dp", "none") != "none" or getattr(privacy, "secure_aggregation", False)):
        raise ConfigError("privacy (DP, secure aggregation) is not supported through Flower yet")


def settings_of(cfg: RunConfig, num_clients: int) -> RunSettings:
    return RunSettings(cfg.seed, cfg.rounds, cfg.clients_per_round, dataclasses.asdict(cfg.train), num_clients)


def _recipe(name: str) -> Any:
    """One recipe per process, like the simulator's: FLoRA's keeps the merged base of the (shared) model.
    Module level on purpose: Flower ships the ClientApp to its Ray actor pickled, and a closure's globals
    travel by value, so a cache referenced from `load` itself would start empty for every message."""
    if name not in _recipes:
        _recipes[name] = recipe_for(name)
    return _recipes[name]


def make_client_app(scenario: str | None = None, overrides: list[str] = ()) -> ClientApp:
    def load(context: Context) -> Participant:
        cfg, sc = load_scenario(context.run_config, scenario, overrides)
        ids = sorted(sc.clients)
        pid = int(context.node_config.get("partition-id", -1))
        if not 0 <= pid < len(ids):
            raise ConfigError(f"node partition-id {pid} outside the scenario's {len(ids)} clients")
        return Participant(ids[pid], sc.loaded.model, _recipe(cfg.strategy["name"]), sc.clients[ids[pid]])

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
    cfg, sc = load_scenario(rc, scenario, overrides)
    model = sc.loaded.model
    spec = ModelSpec({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    strategy, recipe = build(cfg.strategy, settings_of(cfg, len(sc.clients)))
    if hasattr(strategy, "known_probabilities"):  # FedAU's oracle, as the simulator sets it (always available)
        strategy.known_probabilities = {cid: min(cfg.clients_per_round, len(sc.clients)) / len(sc.clients)
                                        for cid in sc.clients}

    def evaluate_on(data, state: GlobalState) -> dict[str, float]:
        task = Task("evaluate", state.round, {"batch_size": cfg.eval.batch_size}, state.tensors)
        recipe.prepare(model, task)
        return recipe.evaluate(model, data, task)

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
    fs = FedadaptStrategy(strategy, spec, num_rounds=cfg.rounds, min_nodes=len(sc.clients),
                          min_results=cfg.coordinator.min_results,
                          evaluate=lambda s: evaluate_on(sc.eval_subset, s), eval_every=cfg.eval.every,
                          fraction_evaluate=float(rc.get("fraction-evaluate", 0.0)),
                          eval_batch_size=cfg.eval.batch_size, seed=cfg.seed, on_round=on_round)
    train_start = time.perf_counter()
    fs.start(grid=grid, initial_arrays=global_arrays(fs.state), num_rounds=cfg.rounds,
             timeout=cfg.coordinator.round_timeout or 3600)
    state = fs.state
    if out is not None:
        save_file({k: v.contiguous() for k, v in state.tensors.items()}, str(out / "model.safetensors"))
        final = evaluate_on(sc.test, state)
        summary = {"rounds": cfg.rounds, "clients": len(sc.clients), "accuracy": final["accuracy"],
                   "loss": final["loss"], "test_examples": len(sc.test),
                   "train_seconds": time.perf_counter() - train_start, "total_seconds": time.perf_counter() - t0}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return state

