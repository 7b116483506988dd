"""From a RunConfig to the pieces of a simulation: task data, model with adapter, client partitions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fedadapt.core.config import RunConfig
from fedadapt.core.errors import DataError
from fedadapt.core.rng import derive_seed, permutation
from fedadapt import data
from fedadapt.data import TaskData, partition
from fedadapt.models.adapters import attach_full, attach_lora
from fedadapt.models.classifier import Features
from fedadapt.models.loading import LoadedModel, load_classifier


def load_task(cfg: RunConfig) -> TaskData:
    d, seed = cfg.data, cfg.seed
    if d.dataset == "shakespeare-genre":
        return data.load_shakespeare_genre(snippet_lines=d.snippet_lines, min_lines=d.min_lines,
                                           test_fraction=d.test_fraction, seed=seed)
    if d.dataset == "digits":
        return data.load_digits(test_fraction=d.test_fraction, seed=seed)
    if d.dataset == "mnist1d":
        return data.load_mnist1d(seed=seed)
    if d.dataset == "synthetic":
        return data.load_synthetic(num_examples=d.num_examples, test_fraction=d.test_fraction, seed=seed)
    if Path(d.dataset).suffix in (".jsonl", ".csv") or Path(d.dataset).exists():
        return data.load_file(d.dataset, text_field=d.text_field, label_field=d.label_field,
                              group_field=d.group_field or None, test_fraction=d.test_fraction, seed=seed)
    raise DataError(f"unknown dataset {d.dataset!r}: use shakespeare-genre, digits, mnist1d, synthetic "
                    "or a path to a .jsonl/.csv file")


def build_model(cfg: RunConfig, task: TaskData) -> LoadedModel:
    feats = task.train.features
    loaded = load_classifier(cfg.model.source, num_labels=len(task.train.label_names),
                             max_length=cfg.model.max_length,
                             input_dim=feats.shape[1] if isinstance(feats, torch.Tensor) else 0,
                             hidden=cfg.model.hidden, seed=derive_seed(cfg.seed, "model"))
    a = cfg.adapter
    if a.kind == "lora":
        attach_lora(loaded.model, rank=a.rank, alpha=a.alpha, target_modules=a.target_modules,
                    dropout=a.dropout, seed=derive_seed(cfg.seed, "lora"))
    else:
        attach_full(loaded.model)
    return loaded


@dataclass
class Scenario:
    task: TaskData
    loaded: LoadedModel
    clients: dict[str, Features]
    eval_subset: Features  # fixed seeded subset evaluated every round
    test: Features
    test_unseen: Features | None


def build_scenario(cfg: RunConfig) -> Scenario:
    task = load_task(cfg)
    loaded = build_model(cfg, task)
    d = cfg.data
    parts = partition(task.train, scheme=d.partition, num_clients=d.num_clients or None, alpha=d.alpha,
                      seed=cfg.seed, min_examples=d.min_examples)
    for cid, idx in parts.items():
        if len(idx) == 0:
            raise DataError(f"client {cid!r} has no training examples; change data.partition or data.num_clients")
    train = loaded.featurize(task.train.features, task.train.labels)
    clients = {cid: _subset(train, torch.as_tensor(idx, dtype=torch.long)) for cid, idx in parts.items()}
    test = loaded.featurize(task.test.features, task.test.labels)
    if len(test) == 0:
        raise DataError(f"dataset {d.dataset!r} has no test examples; raise data.test_fraction")
    eval_subset = _sample(test, cfg.eval.max_examples, derive_seed(cfg.seed, "eval"))
    unseen = task.test_unseen
    test_unseen = loaded.featurize(unseen.features, unseen.labels) if unseen is not None and len(unseen) else None
    if cfg.eval.final_max_examples > 0:
        test = _sample(test, cfg.eval.final_max_examples, derive_seed(cfg.seed, "final"))
        if test_unseen is not None:
            test_unseen = _sample(test_unseen, cfg.eval.final_max_examples, derive_seed(cfg.seed, "final-unseen"))
    return Scenario(task, loaded, clients, eval_subset, test, test_unseen)


def _sample(f: Features, k: int, seed: int) -> Features:
    """A seeded subset of at most k examples, in their original order."""
    if k >= len(f):
        return f
    return _subset(f, permutation(seed, len(f))[:k].sort().values)


def _subset(f: Features, idx: torch.Tensor) -> Features:
    return Features({k: v[idx] for k, v in f.inputs.items()}, f.labels[idx])
