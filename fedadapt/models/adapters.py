"""Adapters: which parameters train, and their state — the only thing that travels or is swapped.

The adapter state of a model is exactly its trainable parameters (LoRA factors plus the task head,
or every parameter for full fine-tuning). Virtual clients share one model and swap only this state.
"""

from __future__ import annotations

import torch
from torch import nn

from fedadapt.core.errors import ModelError


def attach_lora(model: nn.Module, *, rank: int, alpha: float, target_modules: list[str] | str | None = None,
                dropout: float = 0.0, seed: int = 0, fan_in_fan_out: bool = False) -> nn.Module:
    """Wrap `model.encoder` with peft LoRA; the encoder is frozen, LoRA factors and the head train.

    `target_modules=None` (or empty) takes peft's usual choice for the architecture (query/value
    projections). The LoRA A init is seeded so every party builds the same starting adapter.
    `fan_in_fan_out`: the targets store their weight transposed (GPT-2's Conv1D).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules or None,
                        fan_in_fan_out=fan_in_fan_out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model.encoder = get_peft_model(model.encoder, config)
        except ValueError as exc:
            raise ModelError(f"cannot attach LoRA: {exc}") from None
    for p in model.head.parameters():
        p.requires_grad_(True)
    return model


def attach_full(model: nn.Module) -> nn.Module:
    """Full fine-tuning: every parameter trains and travels."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into the trainable parameters in place; names and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params.keys() != tensors.keys():
        missing = sorted(params.keys() - tensors.keys())
        extra = sorted(tensors.keys() - params.keys())
        raise ModelError(f"adapter state does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != tensors[name].shape:
                raise ModelError(f"adapter tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                 f"the model expects {tuple(p.shape)}")
            p.copy_(tensors[name])


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold LoRA into the encoder's base weights (peft merge_and_unload); the head is kept."""
    from peft import PeftModel

    if isinstance(model.encoder, PeftModel):
        model.encoder = model.encoder.merge_and_unload()
    return model
