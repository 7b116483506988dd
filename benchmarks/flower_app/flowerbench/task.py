"""Model and synthetic data shared by the ServerApp and the ClientApp."""
from __future__ import annotations

import torch
from torch import nn

IN_DIM, HIDDEN, OUT_DIM = 32, 64, 4


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT_DIM))


def client_data(partition_id: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic synthetic classification data for one client."""
    g = torch.Generator().manual_seed(seed * 100_003 + partition_id)
    x = torch.randn(n, IN_DIM, generator=g)
    y = torch.randint(0, OUT_DIM, (n,), generator=g)
    return x, y


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(max(steps, 1)):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    return float(loss.item())
