"""Central DP (DP-FedAvg, McMahan et al. 2018): the server clips each client's update to L2 norm C and
adds Gaussian noise N(0, (z C)^2) to their sum; the mean uses a fixed denominator (the expected number
of participants) so one client's presence changes the sum by at most C, whatever the others do.

Each round is one step of the sampled Gaussian mechanism with the round's real sampling rate
q_t = (clients asked) / (clients available); the ledger composes them with opacus' accountant.
"""

from __future__ import annotations

import math

import torch

from fedadapt.core.config import PrivacyConfig
from fedadapt.core.errors import ConfigError
from fedadapt.core.rng import derive_seed, generator

from .ledger import BUDGET_SLACK, Ledger, calibrate

Tensors = dict[str, torch.Tensor]


def l2_norm(tensors: Tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values() if t.is_floating_point()))


def clip(update: Tensors, c: float) -> tuple[Tensors, float]:
    """`update` scaled to L2 norm at most c (all tensors together); returns it and the norm before."""
    norm = l2_norm(update)
    factor = min(1.0, c / norm) if norm > 0 and math.isfinite(c) else 1.0
    return {k: v * factor if v.is_floating_point() else v for k, v in update.items()}, norm


def noised_sum(updates: list[Tensors], c: float, z: float, gen: torch.Generator) -> tuple[Tensors, dict[str, float]]:
    """sum_k clip(u_k, c) + N(0, (z c)^2) per coordinate; float64 accumulation, each tensor's dtype out."""
    total: dict[str, torch.Tensor] = {}
    norms = []
    for u in updates:
        clipped, norm = clip(u, c)
        norms.append(norm)
        for k, v in clipped.items():
            total[k] = total[k] + v.double() if k in total else v.double().clone()
    std = z * c
    out = {}
    for k, v in total.items():
        noise = torch.normal(0.0, std, v.shape, generator=gen, dtype=torch.float64) if std > 0 else 0.0
        out[k] = (v + noise).to(updates[0][k].dtype)
    clipped_share = sum(n > c for n in norms) / max(len(norms), 1)
    return out, {"central_dp_clipped": clipped_share, "central_dp_update_norm": sum(norms) / max(len(norms), 1)}


class CentralDP:
    """The server side of central DP for one run: the noise multiplier (given, or calibrated so that the
    planned rounds spend the budget), the run's ledger, and each round's clipped, noised release."""

    def __init__(self, cfg: PrivacyConfig, seed: int, clients_per_round: int, num_clients: int, rounds: int):
        self.cfg, self.seed = cfg, seed
        self.clients_per_round, self.num_clients, self.rounds = clients_per_round, num_clients, rounds
        self.ledger = Ledger(cfg.epsilon, cfg.delta, cfg.accountant)

    def noise(self) -> float:
        if self.cfg.noise_multiplier > 0:
            return self.cfg.noise_multiplier
        if self.num_clients <= 0:
            raise ConfigError("privacy.dp = 'central' with a calibrated noise needs the number of clients; "
                              "give privacy.noise_multiplier instead")
        q = min(1.0, self.clients_per_round / self.num_clients)
        return calibrate(self.cfg.epsilon, self.cfg.delta, q, self.cfg.planned_rounds or self.rounds,
                         self.cfg.accountant)

    def affordable(self, available: int) -> bool:
        """Whether one more round among `available` clients stays within the budget."""
        q = min(1.0, self.clients_per_round / available)
        return self.ledger.would_spend(self.noise(), q, 1) <= self.cfg.epsilon * (1 + BUDGET_SLACK)

    def plan(self, asked: int, available: int) -> tuple[float, float, int]:
        """(noise multiplier, this round's sampling rate, the fixed denominator: the expected participants)."""
        return self.noise(), min(1.0, asked / available), min(self.clients_per_round, available)

    def release(self, rnd: int, uploads: list[Tensors], plan: tuple[float, float, int],
                base: Tensors | None) -> tuple[Tensors, dict[str, float]]:
        """The round's aggregate, recorded in the ledger. `base` None: the noised sum of the clipped uploads
        (sums such as Fed-SB's init gradients); else the uploads are models, and the result is `base` plus the
        noised sum of their clipped updates over the fixed denominator."""
        z, q, denominator = plan
        gen = generator(derive_seed(self.seed, "central-dp", rnd))
        c = self.cfg.max_grad_norm
        if base is None:
            out, metrics = noised_sum(uploads, c, z, gen)
        else:
            deltas = [{k: v - base[k] for k, v in u.items()} for u in uploads]
            total, metrics = noised_sum(deltas, c, z, gen)
            out = {k: base[k] + v / denominator for k, v in total.items()}
        self.ledger.record(z, q, 1)
        return out, {**metrics, "privacy/epsilon": self.ledger.spent, "privacy/noise_multiplier": z,
                     "privacy/sample_rate": q}
