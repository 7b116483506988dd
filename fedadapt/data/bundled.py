"""Small tasks that need no download: scikit-learn digits, MNIST-1D, Gaussian blobs."""

from __future__ import annotations

import random

import numpy as np
import torch

from fedadapt.core.errors import DataError
from fedadapt.data._split import split_task
from fedadapt.data.base import Dataset, TaskData

_DIGIT_NAMES = [str(d) for d in range(10)]


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> TaskData:
    """scikit-learn's bundled 8x8 digits (1797 examples), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_load_digits  # heavy import, only when asked

    bunch = sk_load_digits()
    # Pixel intensities are integers 0..16 in this dataset.
    features = torch.as_tensor(bunch.data / 16.0, dtype=torch.float32)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return split_task("digits", Dataset(features, labels, list(_DIGIT_NAMES)), test_fraction, seed)


def load_mnist1d(*, seed: int = 0, num_samples: int | None = None) -> TaskData:
    """MNIST-1D generated locally (never downloaded) with the package's default args.

    `seed` replaces the generator's default seed (42, the seed of the published
    data set); `num_samples` (default 5000) is split 80/20 by the package.
    """
    bad = isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 20
    if num_samples is not None and bad:
        raise DataError(f"num_samples for mnist1d must be an integer of at least 20, got {num_samples!r}.")
    # mnist1d.data imports `requests` but make_dataset/get_dataset_args never use the network;
    # get_dataset (which can download) is deliberately not called.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    if num_samples is not None:
        args.num_samples = num_samples
    # make_dataset reseeds the global `random` and NumPy RNGs; restore them so a
    # caller's own seeded streams are not silently reset by loading data.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        raw = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    def part(x: np.ndarray, y: np.ndarray) -> Dataset:
        return Dataset(
            torch.as_tensor(x, dtype=torch.float32),
            torch.as_tensor(y, dtype=torch.int64),
            list(_DIGIT_NAMES),
        )

    return TaskData("mnist1d", part(raw["x"], raw["y"]), part(raw["x_test"], raw["y_test"]), None)


def load_synthetic(
    *,
    num_examples: int = 640,
    dim: int = 32,
    num_classes: int = 4,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> TaskData:
    """Balanced Gaussian blobs: learnable by a linear model, but not perfectly.

    Class centres have norm ~3 and the noise is unit variance per dimension, so
    two classes are ~2 standard deviations apart along the line joining them
    (a few percent Bayes error): accuracy moves visibly while training.
    """
    for name, value, least in (("num_examples", num_examples, 2), ("dim", dim, 1), ("num_classes", num_classes, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise DataError(f"{name} for the synthetic task must be an integer of at least {least}, got {value!r}.")
    if num_examples < 2 * num_classes:
        raise DataError(
            f"num_examples={num_examples} is too few for {num_classes} classes; use at least {2 * num_classes}."
        )
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=gen) * (3.0 / dim**0.5)
    labels = torch.arange(num_examples, dtype=torch.int64) % num_classes
    labels = labels[torch.randperm(num_examples, generator=gen)]
    features = centres[labels] + torch.randn(num_examples, dim, generator=gen)
    data = Dataset(features.float(), labels, [f"class-{c}" for c in range(num_classes)])
    return split_task("synthetic", data, test_fraction, seed)
