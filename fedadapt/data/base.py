"""The in-memory data model every loader returns and every partitioner reads."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Dataset:
    """Examples of one task, all in memory."""

    features: list[str] | list[list[dict[str, str]]] | torch.Tensor  # texts, conversations (chat data: a
    # list of {"role", "content"} messages each; labels are unused zeros), or float32 features [N, D]
    labels: torch.Tensor  # int64, shape [N]
    label_names: list[str]
    groups: list[str] | None = None  # natural id per example (e.g. "HAMLET/HAM"), or None

    def __post_init__(self) -> None:
        # Loaders build these, so a mismatch is a bug in fedadapt, not user input.
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D int64 tensor, got {self.labels.dtype} {tuple(self.labels.shape)}")
        n = len(self.labels)
        if isinstance(self.features, torch.Tensor):
            if self.features.dim() != 2 or self.features.dtype != torch.float32:
                raise ValueError(
                    f"tensor features must be float32 of shape [N, D], got {self.features.dtype} "
                    f"{tuple(self.features.shape)}"
                )
        if len(self.features) != n:
            raise ValueError(f"{len(self.features)} features but {n} labels")
        if self.groups is not None and len(self.groups) != n:
            raise ValueError(f"{len(self.groups)} groups but {n} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def is_text(self) -> bool:
        return not isinstance(self.features, torch.Tensor)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def subset(self, idx: Sequence[int] | torch.Tensor) -> Dataset:
        """The examples at `idx`, in that order (label names are kept whole)."""
        index = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        positions = index.tolist()
        features: list[str] | torch.Tensor
        if isinstance(self.features, torch.Tensor):
            features = self.features[index]
        else:
            features = [self.features[i] for i in positions]
        groups = None if self.groups is None else [self.groups[i] for i in positions]
        return Dataset(features, self.labels[index], list(self.label_names), groups)


@dataclass
class TaskData:
    name: str
    train: Dataset
    test: Dataset  # held-out examples of the same population as train
    test_unseen: Dataset | None  # for natural splits: examples of groups never in train (else None)
    kind: str = "classification"  # or "causal-lm": conversations to learn the assistant's turns of


def default_cache_dir() -> Path:
    """Where fetched corpora and computed partitions are kept: $FEDADAPT_CACHE or ~/.cache/fedadapt."""
    return Path(os.environ.get("FEDADAPT_CACHE") or Path.home() / ".cache" / "fedadapt")
