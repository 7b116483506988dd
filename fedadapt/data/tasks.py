"""From a run's `[data]` config to its task and its clients' partitions.

Shared by the simulator, the coordinator (which builds the model's initial adapter state) and client
daemons started with `--partition` (which rebuild their own share of a bundled dataset locally).
"""

from __future__ import annotations

from pathlib import Path

from fedadapt.core.config import RunConfig
from fedadapt.core.errors import DataError

from . import load_digits, load_file, load_mnist1d, load_shakespeare_genre, load_synthetic, partition
from .base import TaskData


def load_task(cfg: RunConfig) -> TaskData:
    d, seed = cfg.data, cfg.seed
    if d.dataset == "shakespeare-genre":
        return load_shakespeare_genre(snippet_lines=d.snippet_lines, min_lines=d.min_lines,
                                      test_fraction=d.test_fraction, seed=seed)
    if d.dataset == "digits":
        return load_digits(test_fraction=d.test_fraction, seed=seed)
    if d.dataset == "mnist1d":
        return load_mnist1d(seed=seed)
    if d.dataset == "synthetic":
        return load_synthetic(num_examples=d.num_examples, test_fraction=d.test_fraction, seed=seed)
    if Path(d.dataset).suffix in (".jsonl", ".csv") or Path(d.dataset).exists():
        return load_file(d.dataset, text_field=d.text_field, label_field=d.label_field,
                         group_field=d.group_field or None, test_fraction=d.test_fraction, seed=seed)
    raise DataError(f"unknown dataset {d.dataset!r}: use shakespeare-genre, digits, mnist1d, synthetic "
                    "or a path to a .jsonl/.csv file")


def client_partitions(cfg: RunConfig, task: TaskData) -> dict[str, list[int]]:
    """Client id -> indices into task.train; every client has at least one example."""
    d = cfg.data
    parts = partition(task.train, scheme=d.partition, num_clients=d.num_clients or None, alpha=d.alpha,
                      seed=cfg.seed, min_examples=d.min_examples)
    for cid, idx in parts.items():
        if len(idx) == 0:
            raise DataError(f"client {cid!r} has no training examples; change data.partition or data.num_clients")
    return parts


def input_dim(task: TaskData) -> int:
    """Feature width of a tensor dataset (0 for text)."""
    return 0 if task.train.is_text else int(task.train.features.shape[1])
