"""The local training loop every client recipe reuses, and evaluation.

Seeded end to end: batch order comes from a dedicated generator and model randomness (dropout) from
a forked global RNG, so the same task seed gives bit-identical tensors on the same machine.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import nn

from fedadapt.core.config import TrainConfig, from_dict
from fedadapt.core.rng import derive_seed, generator
from fedadapt.models.device import device_of, on_device

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


def train_local(model: nn.Module, data: Any, cfg: TrainConfig, seed: int) -> dict[str, float]:
    """Train the model's trainable parameters in place on `data` (a task's features: classification or
    causal-lm, whose `loss` is the objective); returns mean loss, optimizer steps and examples seen. Each
    step accumulates `cfg.grad_accum_steps` micro-batches of `cfg.batch_size`."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(data)
    batch_size = min(cfg.batch_size, n)
    accum = cfg.grad_accum_steps
    steps = cfg.local_epochs * math.ceil(n / (batch_size * accum)) if cfg.local_epochs > 0 else cfg.local_steps
    optimizer = make_optimizer(params, cfg)
    device = device_of(model)
    model.train()
    total, seen = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "model"))
        micro = batches(n, batch_size, steps * accum, seed)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            for idx in itertools.islice(micro, accum):
                inputs, labels = on_device(data.batch(idx), device)
                loss = data.loss(model(**inputs), labels)
                (loss / accum if accum > 1 else loss).backward()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
    return {"loss": total / max(seen, 1), "steps": float(steps), "examples": float(seen)}


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, batch_size: int = 128) -> dict[str, float]:
    """The task's metrics over all of `data` (classification: mean cross-entropy and accuracy; causal-lm: loss
    per assistant token, perplexity and token accuracy), from per-batch sums."""
    model.eval()
    device = device_of(model)
    sums: dict[str, float] = {}
    for start in range(0, len(data), batch_size):
        inputs, labels = on_device(data.batch(torch.arange(start, min(start + batch_size, len(data)))), device)
        for k, v in data.eval_sums(model(**inputs), labels).items():
            sums[k] = sums.get(k, 0.0) + v
    return data.eval_metrics(sums, len(data))
