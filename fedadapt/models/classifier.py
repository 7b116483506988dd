"""A classifier = an encoder (pretrained transformer or small MLP) + a linear head.

Text encoders are mean-pooled over real tokens. Inputs are pre-tokenised once into padded tensors
(`Features`); each batch is trimmed to its longest real sequence so short texts cost less.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Examples:
    """What every task's features share: a seeded sample of a subclass's `subset`."""

    def sample(self, k: int, seed: int):
        """A seeded subset of at most k examples, in their original order."""
        if k >= len(self):
            return self
        from fedadapt.core.rng import permutation

        return self.subset(permutation(seed, len(self))[:k].sort().values)


@dataclass
class Features(Examples):
    """Model-ready inputs of a whole dataset: every tensor has the examples on dim 0."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> Features:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Features({k: v[idx] for k, v in self.inputs.items()}, self.labels[idx])

    def batch(self, idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs = {k: v[idx] for k, v in self.inputs.items()}
        mask = inputs.get("attention_mask")
        if mask is not None:  # trim padding columns no example of this batch uses
            width = max(int(mask.sum(dim=1).max()), 1)
            inputs = {k: v[:, :width] for k, v in inputs.items()}
        return inputs, self.labels[idx]

    # The objective and its metrics, here with the data they belong to, so that every training loop (plain,
    # DP-SGD, zeroth-order, Fed-SB's init) works for any task (models/causal_lm.py's ChatFeatures has the same).
    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits, labels, reduction=reduction)

    @staticmethod
    def eval_sums(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return {"loss": float(F.cross_entropy(logits, labels, reduction="sum")),
                "correct": float(int((logits.argmax(dim=-1) == labels).sum()))}

    @staticmethod
    def eval_metrics(sums: dict[str, float], examples: int) -> dict[str, float]:
        n = max(examples, 1)
        return {"loss": sums.get("loss", 0.0) / n, "accuracy": sums.get("correct", 0.0) / n,
                "examples": float(examples)}


class TextClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


class MLPClassifier(nn.Module):
    def __init__(self, input_dim: int, hidden: list[int], num_labels: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.encoder = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class ByteTokenizer:
    """UTF-8 bytes as token ids (pad = 0), for config-built models that ship no tokenizer."""

    vocab_size = 258  # 256 bytes shifted by 2, plus pad (0) and bos (1)

    def __call__(self, texts: list[str], *, max_length: int) -> dict[str, torch.Tensor]:
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, text in enumerate(texts):
            row = [1] + [b + 2 for b in text.encode("utf-8")][: max_length - 1]
            ids[i, : len(row)] = torch.tensor(row)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}
