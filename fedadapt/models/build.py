"""The run's model with its adapter attached, built identically on every party from the config.

Frozen base weights are pretrained or derived from the run seed, so the coordinator and each client
hold the same base without ever sending it; only adapter tensors travel.
"""

from __future__ import annotations

from fedadapt.core.config import RunConfig
from fedadapt.core.errors import ConfigError
from fedadapt.core.rng import derive_seed

from .adapters import attach_full, attach_lora
from .causal_lm import ChatTokenizer, load_causal_lm, lora_targets
from .loading import LoadedModel, load_classifier
from .supermask import attach_supermask


def build_model(cfg: RunConfig, num_labels: int, input_dim: int = 0) -> LoadedModel:
    m, a = cfg.model, cfg.adapter
    if m.task == "causal-lm":
        return _causal_lm(cfg)
    loaded = load_classifier(m.source, num_labels=num_labels, max_length=m.max_length,
                             input_dim=input_dim, hidden=m.hidden, seed=derive_seed(cfg.seed, "model"))
    if a.kind == "lora" or (a.kind == "supermask" and m.source != "mlp" and a.rank > 0):
        attach_lora(loaded.model, rank=a.rank, alpha=a.alpha, target_modules=a.target_modules,
                    dropout=a.dropout, seed=derive_seed(cfg.seed, "lora"))
    elif a.kind == "full" or cfg.model.source == "mlp":
        attach_full(loaded.model)
    else:  # a text model's supermask on the head alone
        loaded.model.encoder.requires_grad_(False)
    if a.kind == "supermask":  # masks what would train: the whole mlp, or LoRA factors + head
        attach_supermask(loaded.model, keep=a.keep, seed=derive_seed(cfg.seed, "supermask"))
    return loaded


def _causal_lm(cfg: RunConfig) -> LoadedModel:
    """A local Hugging Face causal LM on the run's device and dtype, with LoRA (or every parameter) training."""
    m, a = cfg.model, cfg.adapter
    if a.kind == "supermask":
        raise ConfigError("adapter.kind = 'supermask' (FRL) masks an MLP or a classifier's LoRA factors and head; "
                          "it is not wired for the causal-lm task: use adapter.kind = 'lora' with another strategy")
    model, tokenizer = load_causal_lm(m.source, device=m.device, dtype=m.dtype, quantize=m.quantize)
    if a.kind == "lora":
        targets, transposed = lora_targets(model.encoder, a.target_modules)
        attach_lora(model, rank=a.rank, alpha=a.alpha, target_modules=targets, dropout=a.dropout,
                    seed=derive_seed(cfg.seed, "lora"), fan_in_fan_out=transposed)
    else:
        attach_full(model)
    if cfg.train.gradient_checkpointing:
        model.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return LoadedModel(model, ChatTokenizer(tokenizer, m.max_length), m.source, "causal-lm", tokenizer)
