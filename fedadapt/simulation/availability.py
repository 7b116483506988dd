"""Client availability in simulations (ALGORITHMS.md §2.1): which virtual clients answer in each round.

Client n is available a long-run fraction p_n of the rounds, drawn once per seed (`probabilities`), in one
of three patterns as in FedAU's code: independent Bernoulli(p_n) rounds, a two-state Markov chain with
stationary probability p_n, or cycles with an available block of about p_n * period rounds.

Every draw is a pure function of (seed, round, client) through `derive_seed` (the Markov chain of a client
is the same sequence of such draws, replayed from round 1), so a resumed or re-ordered run sees the same
availability. By default an unavailable client gets its task but never answers, as a silent deployed client:
the engine records "no result", and the strategy learns participation only from the results that arrived.
With `absent = "offline"` it is not connected that round: the strategy samples among the available clients
only (as a coordinator among its connected clients), which secure aggregation needs (a selected client that
stays silent leaves its masks in the others' uploads, and the round is discarded).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedadapt.core.config import AvailabilityConfig
from fedadapt.core.rng import derive_seed
from fedadapt.runtime.engine import ResultMessage, TaskMessage, Transport
from fedadapt.strategies.base import ClientInfo


def _uniform(*parts: object) -> float:
    """A uniform draw in [0, 1) named by `parts`."""
    return derive_seed(*parts) / 2.0**63


def probabilities(cfg: AvailabilityConfig, seed: int, labels: dict[str, torch.Tensor],
                  num_classes: int) -> dict[str, float]:
    """p_n for each client (labels: client id -> its training labels), in [floor, 1].

    "labels" ties availability to the data, as FedAU's experiments do: each class gets a Dirichlet(alpha)
    weight q_c, and p_n = mean * C * sum_c (share of class c in client n's data) * q_c, so clients holding
    the same classes are equally (un)available."""
    ids = sorted(labels)
    if cfg.pattern == "always":
        return {cid: 1.0 for cid in ids}
    rng = np.random.default_rng(derive_seed(seed, "availability", "probabilities"))
    if cfg.probabilities == "labels":
        q = torch.from_numpy(rng.dirichlet([cfg.alpha] * num_classes))
        raw = [cfg.mean * num_classes * float(torch.bincount(labels[cid], minlength=num_classes).double()
                                              .div(len(labels[cid])) @ q) for cid in ids]
    elif cfg.probabilities == "dirichlet":
        raw = (cfg.mean * len(ids) * rng.dirichlet([cfg.alpha] * len(ids))).tolist()
    else:
        raw = [cfg.mean] * len(ids)
    return {cid: min(1.0, max(cfg.floor, r)) for cid, r in zip(ids, raw)}


class Availability:
    def __init__(self, cfg: AvailabilityConfig, seed: int, p: dict[str, float]):
        self.cfg = cfg
        self.seed = seed
        self.p = p
        self._chains: dict[str, list[bool]] = {}  # markov: client -> state in rounds 0, 1, 2, ...

    def available(self, rnd: int, cid: str) -> bool:
        """Whether client `cid` answers in round `rnd` (1-based)."""
        pattern, p = self.cfg.pattern, self.p[cid]
        if pattern == "always":
            return True
        if pattern == "bernoulli":
            return _uniform(self.seed, "availability", cid, rnd) < p
        if pattern == "cyclic":
            active, cycle = self._cycle(p)
            phase = math.floor(_uniform(self.seed, "availability", cid, "phase") * cycle)
            return (rnd + phase) % cycle < active
        return self._markov(cid, rnd)

    def rate(self, cid: str) -> float:
        """Long-run fraction of rounds in which `cid` is available (the 'known p' oracle)."""
        if self.cfg.pattern == "cyclic":
            active, cycle = self._cycle(self.p[cid])
            return active / cycle
        return self.p[cid]

    def count(self, rnd: int) -> int:
        """How many clients are available in round `rnd`."""
        return sum(self.available(rnd, cid) for cid in self.p)

    def _cycle(self, p: float) -> tuple[int, int]:
        # as FedAU's code: at least one round on and one off per cycle
        active = max(1, round(self.cfg.period * p))
        return active, active + max(1, self.cfg.period - active)

    def _markov(self, cid: str, rnd: int) -> bool:
        # FedAU's code: turn on with probability a, off with b = a (1/p - 1), so the stationary probability
        # is p; both are scaled down if b > 1. Round 0 is drawn from the stationary distribution.
        p = self.p[cid]
        on, off = self.cfg.markov_rate, self.cfg.markov_rate * (1.0 / p - 1.0)
        if off > 1.0:
            on, off = on / off, 1.0
        chain = self._chains.setdefault(cid, [_uniform(self.seed, "availability", cid, 0) < p])
        while len(chain) <= rnd:
            u = _uniform(self.seed, "availability", cid, len(chain))
            chain.append(u >= off if chain[-1] else u < on)
        return chain[rnd]


def from_config(cfg: AvailabilityConfig, seed: int, labels: dict[str, torch.Tensor],
                num_classes: int) -> Availability:
    return Availability(cfg, seed, probabilities(cfg, seed, labels, num_classes))


class AvailabilityTransport:
    """A Transport whose clients answer only in the rounds they are available (and, offline, are offered to
    the strategy only then)."""

    def __init__(self, inner: Transport, availability: Availability, offline: bool = False, first_round: int = 1):
        self.inner = inner
        self.availability = availability
        self.offline = offline
        self.round = first_round  # the round the engine asks for clients for next (the engine runs them in order)

    def clients(self) -> list[ClientInfo]:
        clients = self.inner.clients()
        if self.offline:
            clients = [c for c in clients if self.availability.available(self.round, c.client_id)]
        return clients

    def run(self, tasks: list[TaskMessage], *, timeout: float | None) -> list[ResultMessage]:
        self.round = (tasks[0].round if tasks else self.round) + 1
        return self.inner.run([t for t in tasks if self.availability.available(t.round, t.client_id)],
                              timeout=timeout)
