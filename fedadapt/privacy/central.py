"""Central DP (DP-FedAvg, McMahan et al. 2018): the server clips each client's update to L2 norm C and
adds Gaussian noise N(0, (z C)^2) to their sum; the mean uses a fixed denominator (the expected number
of participants) so one client's presence changes the sum by at most C, whatever the others do.

Each round is one step of the sampled Gaussian mechanism with the round's real sampling rate
q_t = (clients asked) / (clients available); the ledger composes them with opacus' accountant.
"""

from __future__ import annotations

import math

import torch

Tensors = dict[str, torch.Tensor]


def l2_norm(tensors: Tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values() if t.is_floating_point()))


def clip(update: Tensors, c: float) -> tuple[Tensors, float]:
    """`update` scaled to L2 norm at most c (all tensors together); returns it and the norm before."""
    norm = l2_norm(update)
    factor = min(1.0, c / norm) if norm > 0 and math.isfinite(c) else 1.0
    return {k: v * factor if v.is_floating_point() else v for k, v in update.items()}, norm


def noised_sum(updates: list[Tensors], c: float, z: float, gen: torch.Generator) -> tuple[Tensors, dict[str, float]]:
    """sum_k clip(u_k, c) + N(0, (z c)^2) per coordinate; float64 accumulation, each tensor's dtype out."""
    total: dict[str, torch.Tensor] = {}
    norms = []
    for u in updates:
        clipped, norm = clip(u, c)
        norms.append(norm)
        for k, v in clipped.items():
            total[k] = total[k] + v.double() if k in total else v.double().clone()
    std = z * c
    out = {}
    for k, v in total.items():
        noise = torch.normal(0.0, std, v.shape, generator=gen, dtype=torch.float64) if std > 0 else 0.0
        out[k] = (v + noise).to(updates[0][k].dtype)
    clipped_share = sum(n > c for n in norms) / max(len(norms), 1)
    return out, {"central_dp_clipped": clipped_share, "central_dp_update_norm": sum(norms) / max(len(norms), 1)}
