"""Supermask layers (edge-popup; ALGORITHMS.md §5.1): the weights are random and frozen, every edge has a
trainable score, and the forward pass uses `W * mask`, where the mask keeps the top fraction `keep` of
the edges by score. Gradients reach the scores straight through the mask.

Both the weights (signed constants, `±sqrt(2)/sqrt(fan_in)`) and the initial scores (Kaiming-uniform,
`U(-1/sqrt(fan_in), 1/sqrt(fan_in))`) are regenerated on every party from the run seed and the layer's
name, drawn canonically (core.rng), so they are never sent.

Mask convention (the §5.5 discrepancy): the mask keeps the edges with the largest **signed** score,
i.e. the top of the ascending ranking that clients upload and the server votes on. (The reference code
ranks by signed score but masks by |score|, so with keep = 0.5 its global mask is the top quarter *and
the bottom quarter* of the reputation order.) With one convention, "most important by vote" and "kept
by the mask" are the same edges.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from fedadapt.core import rng
from fedadapt.core.errors import ModelError


def kept(n: int, keep: float) -> int:
    """Edges the mask keeps in a layer of n: all but the floor((1 - keep) n) lowest-ranked."""
    return n - math.floor((1.0 - keep) * n)


def ranking(values: torch.Tensor) -> torch.Tensor:
    """Edge ids from least to most important (ascending), ties broken by edge id (stable sort), int64."""
    return torch.sort(values.reshape(-1), stable=True).indices


def top_mask(rank: torch.Tensor, keep: float) -> torch.Tensor:
    """The 0/1 mask (bool, flat) that keeps the `kept(n, keep)` edges at the top of a ranking."""
    n = rank.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=rank.device)
    mask[rank[n - kept(n, keep):].long()] = True
    return mask


class _StraightThroughTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, keep: float) -> torch.Tensor:
        return top_mask(ranking(scores), keep).view_as(scores).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None  # the mask's gradient flows to the scores unchanged


class Supermask(nn.Module):
    """Parametrization of a frozen weight: W -> W * mask(scores). Only `scores` trains."""

    def __init__(self, scores: torch.Tensor, keep: float):
        super().__init__()
        self.keep = keep
        self.scores = nn.Parameter(scores)
        # sigma_l: the sorted initial scores. Rankings only permute this fixed multiset (§5.2).
        self.register_buffer("sigma", scores.detach().reshape(-1).sort().values)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * _StraightThroughTopK.apply(self.scores, self.keep)

    def set_ranking(self, rank: torch.Tensor) -> None:
        """Scores from a ranking: s[rank[j]] = sigma[j], so the j-th least important edge gets sigma[j]."""
        with torch.no_grad():
            self.scores.view(-1)[rank.long().to(self.scores.device)] = self.sigma

    def mask(self) -> torch.Tensor:
        return top_mask(ranking(self.scores.detach()), self.keep).view_as(self.scores)


def supermask_linear(linear: nn.Linear, name: str, *, keep: float, seed: int) -> None:
    """Turn `linear` into a supermask layer in place: signed-constant frozen weight, no bias, scores."""
    shape, fan_in = tuple(linear.weight.shape), linear.in_features
    signs = torch.where(rng.uniform(rng.derive_seed(seed, name, "weight"), shape) < 0.5, -1.0, 1.0)
    bound = 1.0 / math.sqrt(fan_in)
    scores = (rng.uniform(rng.derive_seed(seed, name, "scores"), shape) * 2 - 1) * bound
    dtype, device = linear.weight.dtype, linear.weight.device
    with torch.no_grad():
        linear.weight.copy_(signs * math.sqrt(2.0) * bound)
    linear.weight.requires_grad_(False)
    if linear.bias is not None:
        linear.bias = None  # all a supermask network learns is which edges to keep
    parametrize.register_parametrization(linear, "weight", Supermask(scores.to(dtype=dtype, device=device), keep))


def attach_supermask(model: nn.Module, *, keep: float, seed: int) -> nn.Module:
    """Supermask every linear layer that trains now (all of an MLP; LoRA factors and the head of a text
    model) and freeze everything else. An MLP encoder also gets a non-affine LayerNorm after each linear
    layer: with fixed +-c weights and no bias, activations would otherwise drift in scale with depth."""
    if not 0.0 < keep <= 1.0:
        raise ModelError(f"supermask keep must be in (0, 1], got {keep}")
    if isinstance(getattr(model, "encoder", None), nn.Sequential):
        model.encoder = nn.Sequential(*[layer for m in model.encoder for layer in (
            [m, nn.LayerNorm(m.out_features, elementwise_affine=False)] if isinstance(m, nn.Linear) else [m])])
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and m.weight.requires_grad]
    if not targets:
        raise ModelError("the model has no trainable linear layer to supermask")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in targets:
        supermask_linear(linear, name, keep=keep, seed=seed)
    return model


def supermasks(model: nn.Module) -> dict[str, Supermask]:
    """The model's supermasks by the name of their scores parameter (the name that travels)."""
    return {f"{n}.scores": m for n, m in model.named_modules() if isinstance(m, Supermask)}
