"""What a client daemon trains on for a run: the run's model (built locally) and this machine's data.

The coordinator sends a run spec with each task (runtime/setup.py's `run_spec`): the run's config plus the
label names and input width its model was built with. The client builds the same model from it (base
weights are pretrained or seeded, so they match without being sent), wraps it in the executor every party
runs tasks with, and pairs it with either its own data file or, for demos and tests, its share
(`--partition ID`) of the run's bundled dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fedadapt.client.state import ClientState
from fedadapt.core.config import RunConfig, from_dict
from fedadapt.core.errors import ConfigError, DataError
from fedadapt.data import load_file
from fedadapt.data.chat import load_chats
from fedadapt.data.tasks import client_partitions, load_task
from fedadapt.models.build import build_model
from fedadapt.models.classifier import Features
from fedadapt.runtime.executor import Executor
from fedadapt.runtime.setup import featurize, model_config
from fedadapt.strategies.base import ClientRecipe
from fedadapt.strategies.private import PrivateRecipe
from fedadapt.strategies.registry import recipe_for


@dataclass
class Workload:
    executor: Executor  # the run's model and this client's recipe
    data: Features


def build_workload(spec: dict[str, Any], *, partition: str | None = None, data_file: Path | None = None,
                   model_source: str | None = None, device: str | None = None,
                   state: ClientState | None = None) -> Workload:
    cfg = from_dict(RunConfig, spec["config"])
    recipe = _private_recipe(recipe_for(cfg.strategy["name"]), cfg, str(spec.get("run_id", "")), state)
    if model_source:  # where the base is on this machine
        cfg = replace(cfg, model=replace(cfg.model, source=model_source))
    if device:  # this machine's accelerator, whatever the run's default
        cfg = replace(cfg, model=replace(cfg.model, device=device))
    labels = list(spec["label_names"])
    loaded = build_model(model_config(cfg), len(labels), int(spec.get("input_dim", 0)))
    if partition is not None:
        task = load_task(cfg)
        parts = client_partitions(cfg, task)
        ids = sorted(parts)
        if partition not in parts and partition.isdigit() and int(partition) < len(ids):
            partition = ids[int(partition)]  # an index stands for the id at that position
        if partition not in parts:
            raise DataError(f"partition {partition!r} does not exist in this run's dataset "
                            f"({len(parts)} clients: {_examples(list(parts))})")
        data = featurize(loaded, task.train.subset(parts[partition]))
    elif data_file is not None and cfg.model.task == "causal-lm":  # this machine's conversations, all of them
        data = featurize(loaded, load_chats(data_file, group_field="", test_fraction=0.0, seed=cfg.seed).train)
    elif data_file is not None:
        own = load_file(data_file, text_field=cfg.data.text_field, label_field=cfg.data.label_field,
                        test_fraction=0.0, seed=cfg.seed).train
        unknown = sorted(set(own.label_names) - set(labels))
        if unknown:
            raise DataError(f"{data_file}: label {unknown[0]!r} is not one of the run's labels ({_examples(labels)})")
        remap = torch.tensor([labels.index(n) for n in own.label_names], dtype=torch.long)
        data = loaded.featurize(own.features, remap[own.labels])
    else:
        raise DataError("a client needs --data FILE or --partition ID")
    if len(data) == 0:
        raise DataError("this client has no training examples" + (
            f" (every conversation is longer than model.max_length = {cfg.model.max_length} without a response "
            "token left)" if cfg.model.task == "causal-lm" else ""))
    return Workload(Executor(loaded.model, recipe), data)


def _private_recipe(recipe: ClientRecipe, cfg: RunConfig, run_id: str, state: ClientState | None) -> ClientRecipe:
    """The recipe under the run's [privacy]: DP-SGD with this daemon's ledger on disk, masking with its key."""
    p = cfg.privacy
    if state is not None and state.max_epsilon is not None and p.dp != "client":
        raise ConfigError(f"this client trains only under client DP (started with --max-epsilon "
                          f"{state.max_epsilon:g}); the run has privacy.dp = {p.dp!r}")
    if p.dp != "client" and not p.secure_aggregation:
        return recipe  # central DP happens on the server
    if state is None or not run_id:
        raise ConfigError("this run uses client DP or secure aggregation, which need this client's state folder "
                          "(its privacy ledger and key) to be writable: pass --state-dir DIR")
    return PrivateRecipe(recipe, key=state.secagg_key(), ledger_file=state.ledger_file(run_id),
                         max_epsilon=state.max_epsilon)


def _examples(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
