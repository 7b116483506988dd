"""LoRA-SB (ALGORITHMS.md §4.1-4.2): W = W0 + s * B R A with B (m x r) and A (r x n) frozen and
identical on every client, and only the r x r core R trained.

s = alpha / r with alpha = r, i.e. s = 1, as the reference forces; it is fixed here rather than read
from the adapter config, because a different s would rescale the initial s * B R0 A (§4.7).
peft has no LoRA-SB layer, so this small wrapper replaces the peft LoRA layers of the target modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedadapt.core.errors import ModelError

SCALE = 1.0  # alpha / r with alpha = r


class LoraSBLinear(nn.Module):
    def __init__(self, base: nn.Linear, b: torch.Tensor, a: torch.Tensor, r: torch.Tensor):
        super().__init__()
        self.base_layer = base
        row_major = torch.contiguous_format  # the same memory layout (hence BLAS path) on every party
        self.register_buffer("lorasb_B", b.detach().clone(memory_format=row_major))  # buffers: never trained
        self.register_buffer("lorasb_A", a.detach().clone(memory_format=row_major))
        self.lorasb_R = nn.Parameter(r.detach().clone(memory_format=row_major))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(F.linear(F.linear(x, self.lorasb_A), self.lorasb_R), self.lorasb_B)
        return self.base_layer(x) + SCALE * low


def out_in(layer: nn.Module, t: torch.Tensor | None = None) -> torch.Tensor:
    """`t` (default: the layer's weight) as (out_features, in_features), a view: GPT-2's Conv1D stores its
    weight transposed, (in, out), and everything fedadapt sends or merges is (out, in), as LoRA's B A is."""
    from transformers.pytorch_utils import Conv1D

    t = layer.weight if t is None else t
    return t.T if isinstance(layer, Conv1D) else t


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The base Linear of every adapted module (peft LoRA or already LoRA-SB), by module name."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraSBLinear):
            out[name] = m.base_layer
        elif isinstance(m, LoraLayer):
            out[name] = m.get_base_layer()
    if not out:
        raise ModelError("Fed-SB needs a LoRA model (adapter.kind = \"lora\")")
    return out


def attach_lorasb(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Put LoRA-SB with (B, A, R) on each named module, replacing its peft LoRA layer (or its LoRA-SB)."""
    bases = target_linears(model)
    for name, (b, a, r) in factors.items():
        if name not in bases:
            raise ModelError(f"module {name!r} is not adapted in this model")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoraSBLinear(bases[name], b, a, r))


def frozen_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen B and A buffers of a LoRA-SB model, by their names (what the content hash covers)."""
    return {n: t for n, t in model.named_buffers() if n.endswith((".lorasb_B", ".lorasb_A"))}


def lorasb_init(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Best rank-r factorisation of an update: delta ~= B R0 A with orthonormal B columns and A rows.

    An exact SVD in fp64 (Eckart-Young optimal and deterministic; it runs once, on the server), not
    the reference's randomised svd_lowrank. Returns B (m x r), A (r x n), R0 = diag(sigma_1..r) and the
    fraction of ||delta||_F^2 the rank-r part keeps.
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, s.numel())
    if r < rank:
        raise ModelError(f"rank {rank} exceeds the layer's dimensions {tuple(delta.shape)}")
    total = float(s.pow(2).sum())
    kept = float(s[:r].pow(2).sum()) / total if total > 0 else 1.0
    return u[:, :r], vh[:r], torch.diag(s[:r]), kept
