"""The local training loop every client recipe reuses, and evaluation.

Seeded end to end: batch order comes from a dedicated generator and model randomness (dropout) from
a forked global RNG, so the same task seed gives bit-identical tensors on the same machine.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedadapt.core.config import TrainConfig, from_dict
from fedadapt.core.rng import derive_seed, generator
from fedadapt.models.classifier import Features

_OPTIMIZERS = {"sgd", "adam", "adamw"}


def train_config(task_config: dict[str, Any]) -> TrainConfig:
    """The TrainConfig part of a task's config (the rest, e.g. `seed`, is the task's own)."""
    keys = TrainConfig.__dataclass_fields__.keys()
    return from_dict(TrainConfig, {k: v for k, v in task_config.items() if k in keys}, "train.")


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)}")


def batches(n: int, batch_size: int, steps: int, seed: int):
    """`steps` index batches; each pass over the data is a fresh seeded permutation."""
    g = generator(seed)
    order = torch.randperm(n, generator=g)
    pos = 0
    for _ in range(steps):
        if pos >= n:
            order, pos = torch.randperm(n, generator=g), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def train_local(model: nn.Module, data: Features, cfg: TrainConfig, seed: int) -> dict[str, float]:
    """Train the model's trainable parameters in place; returns mean loss, steps and examples seen."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(data)
    batch_size = min(cfg.batch_size, n)
    steps = cfg.local_epochs * math.ceil(n / batch_size) if cfg.local_epochs > 0 else cfg.local_steps
    optimizer = make_optimizer(params, cfg)
    model.train()
    total, seen = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "model"))
        for idx in batches(n, batch_size, steps, seed):
            inputs, labels = data.batch(idx)
            loss = F.cross_entropy(model(**inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
    return {"loss": total / max(seen, 1), "steps": float(steps), "examples": float(seen)}


@torch.no_grad()
def evaluate(model: nn.Module, data: Features, batch_size: int = 128) -> dict[str, float]:
    """Mean cross-entropy and accuracy over all of `data`."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        inputs, labels = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        logits = model(**inputs)
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
    n = max(len(data), 1)
    return {"loss": loss / n, "accuracy": correct / n, "examples": float(len(data))}
