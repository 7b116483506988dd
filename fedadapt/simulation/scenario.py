"""From a RunConfig to the pieces of a simulation: task data, model with adapter, client partitions."""

from __future__ import annotations

from dataclasses import dataclass

from fedadapt.core.config import RunConfig
from fedadapt.core.errors import DataError
from fedadapt.core.rng import derive_seed
from fedadapt.data import TaskData
from fedadapt.data.tasks import client_partitions, input_dim, load_task
from fedadapt.models.build import build_model
from fedadapt.models.classifier import Features
from fedadapt.models.loading import LoadedModel


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
    loaded = build_model(cfg, task.train.num_classes, input_dim(task))
    d = cfg.data
    parts = client_partitions(cfg, task)
    train = loaded.featurize(task.train.features, task.train.labels)
    clients = {cid: train.subset(idx) for cid, idx in parts.items()}
    test = loaded.featurize(task.test.features, task.test.labels)
    if len(test) == 0:
        raise DataError(f"dataset {d.dataset!r} has no test examples; raise data.test_fraction")
    eval_subset = test.sample(cfg.eval.max_examples, derive_seed(cfg.seed, "eval"))
    unseen = task.test_unseen
    test_unseen = loaded.featurize(unseen.features, unseen.labels) if unseen is not None and len(unseen) else None
    if cfg.eval.final_max_examples > 0:
        test = test.sample(cfg.eval.final_max_examples, derive_seed(cfg.seed, "final"))
        if test_unseen is not None:
            test_unseen = test_unseen.sample(cfg.eval.final_max_examples, derive_seed(cfg.seed, "final-unseen"))
    return Scenario(task, loaded, clients, eval_subset, test, test_unseen)
