"""The run's model with its adapter attached, built identically on every party from the config.

Frozen base weights are pretrained or derived from the run seed, so the coordinator and each client
hold the same base without ever sending it; only adapter tensors travel.
"""

from __future__ import annotations

from fedadapt.core.config import RunConfig
from fedadapt.core.rng import derive_seed

from .adapters import attach_full, attach_lora
from .loading import LoadedModel, load_classifier
from .supermask import attach_supermask


def build_model(cfg: RunConfig, num_labels: int, input_dim: int = 0) -> LoadedModel:
    loaded = load_classifier(cfg.model.source, num_labels=num_labels, max_length=cfg.model.max_length,
                             input_dim=input_dim, hidden=cfg.model.hidden, seed=derive_seed(cfg.seed, "model"))
    a = cfg.adapter
    if a.kind == "lora" or (a.kind == "supermask" and cfg.model.source != "mlp" and a.rank > 0):
        attach_lora(loaded.model, rank=a.rank, alpha=a.alpha, target_modules=a.target_modules,
                    dropout=a.dropout, seed=derive_seed(cfg.seed, "lora"))
    elif a.kind == "full" or cfg.model.source == "mlp":
        attach_full(loaded.model)
    else:  # a text model's supermask on the head alone
        loaded.model.encoder.requires_grad_(False)
    if a.kind == "supermask":  # masks what would train: the whole mlp, or LoRA factors + head
        attach_supermask(loaded.model, keep=a.keep, seed=derive_seed(cfg.seed, "supermask"))
    return loaded
