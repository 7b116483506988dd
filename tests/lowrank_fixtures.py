"""Tiny fp64 fixtures shared by the exact-LoRA strategies' tests: a server built by name and a fake LoRA spec of
two modules (what a model spec holds: `<module>.lora_A/B.default.weight` and a head)."""

from __future__ import annotations

from pathlib import Path

import torch
from deploy import tiny_text_file  # tests/deploy.py

from fedadapt.core.config import RunConfig, load_config
from fedadapt.strategies.base import ModelSpec, RunSettings
from fedadapt.strategies.registry import build

D = torch.float64
M1, M2 = "enc.l0.q", "enc.l1.v"


def t(x):
    return torch.tensor(x, dtype=D)


def server(name: str, per_round: int = 3, **opts):
    s, _ = build({"name": name, **opts}, RunSettings(seed=0, rounds=5, clients_per_round=per_round,
                                                     train={"lr": 0.1}))
    return s


def lora_spec(m: int, n: int, r: int, mods=(M1, M2), a: torch.Tensor | None = None) -> ModelSpec:
    """A seeded head (2 x m) and, per module, A (r x n; `a` if given) and B = 0 (m x r)."""
    g = torch.Generator().manual_seed(0)
    out = {"head.weight": torch.randn(2, m, generator=g, dtype=D), "head.bias": torch.zeros(2, dtype=D)}
    for mod in mods:
        out[f"{mod}.lora_A.default.weight"] = torch.randn(r, n, generator=g, dtype=D) if a is None else a.clone()
        out[f"{mod}.lora_B.default.weight"] = torch.zeros(m, r, dtype=D)
    return ModelSpec(out)


def tiny_cfg(tmp_path: Path, rounds: int = 6, per_round: int = 1, extra=()) -> RunConfig:
    """A tiny-llama LoRA run (rank 4) on a three-group text file, for the strategies' real-model tests."""
    data = tiny_text_file(tmp_path / "lines.jsonl", n_groups=3)
    return load_config(None, ["model.source=\"tiny-llama\"", "model.max_length=16", "adapter.rank=4",
                              "adapter.alpha=8.0", "adapter.target_modules=[]", f"data.dataset=\"{data}\"",
                              "data.group_field=\"who\"", f"rounds={rounds}", f"clients_per_round={per_round}",
                              "train.batch_size=4", "train.local_steps=2", "seed=3", *extra])
