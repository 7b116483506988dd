"""Seeded train/test splits shared by the loaders."""

from __future__ import annotations

import random

import torch

from fedadapt.core.errors import DataError
from fedadapt.data.base import Dataset, TaskData


def check_fraction(name: str, value: float) -> float:
    """A fraction in [0, 1); 1 would leave nothing to train on."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise DataError(f"{name} must be a number in [0, 1), got {value!r}.")
    return float(value)


def stratified_split(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, test), each sorted; every label keeps the same test share.

    Stratifying keeps the test label mix equal to the train mix even for small
    files, and `random.Random` gives the same split on every platform.
    """
    test_fraction = check_fraction("test_fraction", test_fraction)
    rng = random.Random(seed)
    train: list[int] = []
    test: list[int] = []
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels.tolist()):
        by_label.setdefault(y, []).append(i)
    for y in sorted(by_label):
        idx = by_label[y]
        rng.shuffle(idx)
        # A class with a single example stays in train: a test-only class cannot be learned.
        n_test = min(round(len(idx) * test_fraction), len(idx) - 1)
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return sorted(train), sorted(test)


def split_task(name: str, data: Dataset, test_fraction: float, seed: int) -> TaskData:
    train_idx, test_idx = stratified_split(data.labels, test_fraction, seed)
    return TaskData(name=name, train=data.subset(train_idx), test=data.subset(test_idx), test_unseen=None)
