"""Weighted sums shared by the strategies that average what clients send (FedAvg, FedAU, FLoRA's head,
Fed-SB's core, zero-padding) or weight their contributions (Ferret's tables, ZO's scalars)."""

from __future__ import annotations

import torch

Tensors = dict[str, torch.Tensor]


def weights(num_examples: list[int], weighting: str) -> list[float]:
    """Normalised aggregation weights p_k (sum to 1)."""
    if weighting == "uniform":
        return [1.0 / len(num_examples)] * len(num_examples)
    total = sum(num_examples)
    return [n / total for n in num_examples]


# Tensors are averaged in batches of about this many bytes: each client's contribution to a batch is one
# torch._foreach_add_ call instead of one Python-level add_ per tensor, and a batch's accumulators are small
# enough to stay in the CPU cache while all clients are added to them.
_BATCH_BYTES = 4 * 1024 * 1024


def weighted_average(models: list[Tensors], p: list[float]) -> Tensors:
    """sum_k p_k * models[k], per tensor, accumulated in place in the tensors' own dtype.

    Non-float tensors (counters, e.g. BatchNorm's num_batches_tracked) cannot be averaged: the first
    client's value is taken.

    Per tensor this is exactly `acc = models[0][name] * p_0; acc.add_(models[k][name], alpha=p_k)` for
    k = 1, 2, ..., so the result is the same bit for bit; the only allocation is the output tensor, and
    no temporaries are made. Consecutive float tensors are processed in batches of about `_BATCH_BYTES`
    through the `torch._foreach_*` ops (one dispatch per client and batch rather than per client and
    tensor), which matters for adapters made of many small tensors.
    """
    first_model = models[0]
    rest = list(zip(models[1:], p[1:]))
    out: Tensors = {}
    batch: list[str] = []
    batch_bytes = 0

    def flush() -> None:
        accs = torch._foreach_mul([first_model[n] for n in batch], p[0])
        for m, w in rest:
            torch._foreach_add_(accs, [m[n] for n in batch], alpha=w)
        out.update(zip(batch, accs))
        batch.clear()

    for name, first in first_model.items():
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        nbytes = first.numel() * first.element_size()
        if batch and batch_bytes + nbytes > _BATCH_BYTES:
            flush()
            batch_bytes = 0
        batch.append(name)
        batch_bytes += nbytes
    if batch:
        flush()
    return {name: out[name] for name in first_model}
