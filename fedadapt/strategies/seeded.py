"""Pieces shared by the shared-randomness strategies (Ferret, shared-seed zeroth-order; ALGORITHMS.md §6).

Every random vector is drawn by core.rng (CPU, fp32, a dedicated generator) from a seed that both the
server and the clients derive from the run, so it never travels. Parameters are always visited in
sorted name order: a safetensors round trip does not keep model order, sorted order survives anything.
Updates are accumulated in fp64 with elementwise ops only (no reductions, no BLAS), so every party
that applies the same scalars to the same start gets the same bits.
"""

from __future__ import annotations

import fnmatch
import math

import torch

from fedadapt.core.errors import ConfigError
from fedadapt.core.rng import derive_seed, generator

from .base import Tensors


def pool_seeds(pool: int, k: int) -> list[int]:
    """The K candidate seeds of a run, fixed for its whole life (regenerated, never sent)."""
    return [derive_seed(pool, "seed", j) for j in range(k)]


def fill_normal(seed: int, out: torch.Tensor) -> torch.Tensor:
    """core.rng.normal(seed, out.shape) written into a preallocated fp32 CPU buffer: the same stream (the
    same generator and kernel), without allocating d floats per seed."""
    return torch.randn(out.shape, generator=generator(seed), out=out)


def selected(names, patterns: list[str]) -> list[str]:
    """The sorted names matching any glob in `patterns` (all of them when `patterns` is empty)."""
    out = sorted(n for n in names if not patterns or any(fnmatch.fnmatchcase(n, p) for p in patterns))
    if not out:
        raise ConfigError(f"strategy.params {patterns} match no trainable parameter")
    return out


def flat64(tensors: Tensors, names: list[str]) -> torch.Tensor:
    """The named tensors, in that order, as one fp64 vector."""
    return torch.cat([tensors[n].detach().reshape(-1).to(torch.float64) for n in names])


def unflat(vec: torch.Tensor, like: Tensors, names: list[str]) -> Tensors:
    """Split `vec` back into tensors shaped (and typed) like `like[name]`; one rounding per element."""
    out, pos = {}, 0
    for n in names:
        t = like[n]
        out[n] = vec[pos : pos + t.numel()].reshape(t.shape).to(t.dtype).contiguous()
        pos += t.numel()
    return out


def det_norm(v: torch.Tensor) -> float:
    """||v||, identical in every process: row sums of a fixed shape, then an exactly rounded fsum.
    (A plain torch.norm may split the sum differently with another number of threads.)"""
    sq = v.to(torch.float64).pow(2)
    pad = (-sq.numel()) % 1024
    rows = torch.nn.functional.pad(sq, (0, pad)).reshape(-1, 1024).sum(dim=1)
    return math.sqrt(math.fsum(rows.tolist()))
