"""Canonical shared randomness.

Every party that must regenerate the same random tensor (shared-seed strategies, client sampling)
draws it here: on the CPU, in fp32, from a dedicated `torch.Generator`, then casts and moves. CUDA
generators and low-precision draws give different streams, so they are never used for shared values.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, e.g. (run_seed, "train", round, client_id).

    Stable across processes, platforms and Python versions (unlike `hash()`).
    """
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int) -> torch.Generator:
    """A fresh CPU generator at `seed`, independent of torch's global RNG."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def normal(seed: int, shape: tuple[int, ...] | torch.Size, *, dtype: torch.dtype = torch.float32,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal tensor, drawn canonically (CPU fp32) then cast and moved."""
    t = torch.randn(tuple(shape), generator=generator(seed), dtype=torch.float32)
    return t.to(dtype=dtype, device=device)


def uniform(seed: int, shape: tuple[int, ...] | torch.Size, *, dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform [0, 1) tensor, drawn canonically (CPU fp32) then cast and moved."""
    t = torch.rand(tuple(shape), generator=generator(seed), dtype=torch.float32)
    return t.to(dtype=dtype, device=device)


def permutation(seed: int, n: int) -> torch.Tensor:
    """A seeded permutation of range(n) (int64)."""
    return torch.randperm(n, generator=generator(seed))
