"""The peft LoRA layers of a model, seen from outside: their frozen base weights and fresh adapters
of any rank. Used by strategies whose state lives in the base weights (FLoRA) or that replace the
LoRA factors with their own parameterisation (Fed-SB).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fedadapt.core.errors import ModelError

from .adapters import adapter_state
from .lorasb import out_in

# A peft LoRA factor's parameter name: <module>.lora_A|B.<adapter>.weight. A and B are told apart by name, never
# by comparing a dimension with the rank (ambiguous when a layer dimension equals the rank: ALGORITHMS.md §3.5).
LORA_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.[^.]+\.weight$")


def lora_layers(model: nn.Module, required: bool = True) -> dict[str, nn.Module]:
    """peft LoRA layers by module name (the names the server sees in front of `.lora_A.*`)."""
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    if not layers and required:
        raise ModelError("this strategy needs a LoRA model (adapter.kind = \"lora\")")
    return layers


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The (frozen) base weight of every LoRA-adapted module, by module name, as (out, in): live tensors (views),
    not copies."""
    return {name: out_in(layer.get_base_layer()) for name, layer in lora_layers(model).items()}


def fresh_lora(model: nn.Module, rank: int, alpha: float, seed: int) -> str:
    """Make a freshly initialised LoRA of `rank` the model's only trainable adapter; returns its name.

    peft's default init (Kaiming-uniform A, B = 0), seeded, so the adapted model equals its base
    exactly until the first step. One peft adapter per rank is kept and re-initialised, so virtual
    clients sharing one model do not accumulate adapters. The scaling alpha/rank is set explicitly.
    """
    from peft import LoraConfig

    encoder = model.encoder
    name = f"rank{rank}"
    if name not in encoder.peft_config:
        base = encoder.peft_config["default"]
        encoder.add_adapter(name, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=base.lora_dropout,
                                             target_modules=base.target_modules))
    encoder.set_adapter(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in lora_layers(model).values():
            layer.reset_lora_parameters(name, True)
            layer.scaling[name] = alpha / rank
    return name


def load_named(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into the model's parameters of the same names (e.g. the task head), in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            p = params.get(name)
            if p is None or p.shape != t.shape:
                raise ModelError(f"tensor {name!r} {tuple(t.shape)} does not fit the model")
            p.copy_(t)


def factor_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable state with LoRA factors named `<module>.lora_A/B` (whatever the peft adapter's name)."""
    out = {}
    for name, t in adapter_state(model).items():
        m = LORA_FACTOR.match(name)
        out[f"{m['module']}.lora_{m['factor']}" if m else name] = t
    return out


def load_factors(model: nn.Module, tensors: dict[str, torch.Tensor], alpha_per_rank: float, seed: int) -> None:
    """Make `<module>.lora_A/B` in `tensors` the model's active LoRA (rank from A's rows), the rest by name."""
    factors = {k for k in tensors if k.endswith((".lora_A", ".lora_B"))}
    rank = next(tensors[k].shape[0] for k in sorted(factors) if k.endswith(".lora_A"))
    name = fresh_lora(model, rank, alpha_per_rank * rank, seed)
    layers = lora_layers(model)
    with torch.no_grad():
        for k in factors:
            module, _, factor = k.rpartition(".")
            getattr(layers[module], factor)[name].weight.copy_(tensors[k])
    load_named(model, {k: v for k, v in tensors.items() if k not in factors})
