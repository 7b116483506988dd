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
from .chat import load_chats
from .shakespeare_chat import load_shakespeare_chat

BUILTIN_TASKS = ("shakespeare-genre", "digits", "mnist1d", "synthetic")
CHAT_DATASETS = ("shakespeare-chat",)


def load_task(cfg: RunConfig) -> TaskData:
    d, seed = cfg.data, cfg.seed
    if cfg.model.task == "causal-lm":
        return _chat_task(cfg)
    if d.dataset in CHAT_DATASETS:
        raise DataError(f"dataset {d.dataset!r} is chat data for the causal-lm task: set model.task = 'causal-lm'")
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


def _chat_task(cfg: RunConfig) -> TaskData:
    d = cfg.data
    if d.dataset == "shakespeare-chat":
        return load_shakespeare_chat(lines=d.snippet_lines, min_speeches=d.min_lines, test_fraction=d.test_fraction,
                                     seed=cfg.seed)
    if d.dataset in BUILTIN_TASKS:
        raise DataError(f"dataset {d.dataset!r} is a classification dataset; the causal-lm task takes chat data: "
                        "'shakespeare-chat', or a .jsonl file or folder of conversations")
    return load_chats(d.dataset, group_field=d.group_field or "client", test_fraction=d.test_fraction, seed=cfg.seed)


def client_partitions(cfg: RunConfig, task: TaskData) -> dict[str, list[int]]:
    """Client id -> indices into task.train; every client has at least one example."""
    d = cfg.data
    if task.kind == "causal-lm" and d.partition == "dirichlet":
        raise DataError("data.partition = 'dirichlet' splits by label, and chat data has none: use 'natural' (one "
                        "client per file or per data.group_field value) or 'iid'")
    parts = partition(task.train, scheme=d.partition, num_clients=d.num_clients or None, alpha=d.alpha,
                      seed=cfg.seed, min_examples=d.min_examples)
    for cid, idx in parts.items():
        if len(idx) == 0:
            raise DataError(f"client {cid!r} has no training examples; change data.partition or data.num_clients")
    return parts


def input_dim(task: TaskData) -> int:
    """Feature width of a tensor dataset (0 for text)."""
    return 0 if task.train.is_text else int(task.train.features.shape[1])
