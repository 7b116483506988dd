"""FedAU (ALGORITHMS.md §2): FedAvg that weights each participant by an online estimate of 1/p_n, the mean
interval between its participations, and divides by the total number of clients N.

    theta <- theta + eta_g * (1/N) * sum_{n in S_t} w_n (theta_n - theta)

The server learns participation only from which valid results reached `aggregate`; nothing is sent besides
FedAvg's payload. Per client it keeps c_n (absent rounds since the last recorded interval), M_n (intervals
recorded) and their sum (Omega_n = sum / M_n), as int64 tensors in GlobalState.aux, so they are part of every
round's atomic commit and a restarted coordinator continues with exactly the same weights.

The spec updates every client in every round. Here a client's entry is brought up to date only when it
takes part (`advance`): its absent rounds since then follow from the round numbers alone, and K-cutoffs
from integer division, so the result is identical (tests/test_fedau.py checks it against a literal per-round
version), the server need not know who the absent clients are, and a round the engine skipped counts as
absent for everyone.

`participation_weights` and `server_update` are the whole method; any strategy whose payload is aggregated
by a weighted sum (LoRA factors, Fed-SB's R, full parameters) can call them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fedadapt.core.codec import Contract, contract_of
from fedadapt.core.config import Section, option
from fedadapt.core.errors import ConfigError
from fedadapt.privacy.compat import Support

from .aggregate import weighted_average
from .base import ClientResult, GlobalState, ModelSpec, RoundOutcome, StrategyBase, Tensors
from .fedavg import FedAvgRecipe

WEIGHTINGS = ("fedau", "participating", "all", "known")
CLIENT_PREFIX = "fedau/client/"  # + client id -> int64 [last round, c, M, sum of intervals]
NUM_CLIENTS = "fedau/num_clients"  # N, fixed when the run starts


class Entry(NamedTuple):
    """One client's estimator state after processing round `last` (0: before the first round)."""

    last: int = 0
    c: int = 0  # consecutive absent rounds not yet recorded as an interval
    m: int = 0  # number of recorded intervals
    total: int = 0  # sum of recorded intervals; Omega = total / m

    @property
    def omega(self) -> float:
        return self.total / self.m if self.m else 1.0


def advance(e: Entry, rnd: int, cutoff: int) -> Entry:
    """`e` after the rounds e.last+1 .. rnd-1, in which the client was absent: each absent round adds 1 to c,
    and with a cutoff K every time c reaches K an interval of length K is recorded and c restarts at 0."""
    c, m, total = e.c + max(0, rnd - 1 - e.last), e.m, e.total
    if cutoff:
        closed, c = divmod(c, cutoff)
        m, total = m + closed, total + closed * cutoff
    return Entry(max(e.last, rnd - 1), c, m, total)


def participate(e: Entry, rnd: int, cutoff: int) -> tuple[float, Entry]:
    """The weight of a client taking part in round `rnd`, and its entry afterwards.

    The weight is read BEFORE the interval this participation closes is recorded, so it depends only on
    earlier rounds (E[w I] = w p); the first participation has weight 1."""
    e = advance(e, rnd, cutoff)
    return e.omega, Entry(rnd, 0, e.m + 1, e.total + e.c + 1)


def participation_weights(aux: Tensors, rnd: int, clients: list[str], cutoff: int) -> tuple[list[float], Tensors]:
    """FedAU weights of `clients` (those whose results arrived in round `rnd`) and the updated aux."""
    aux = dict(aux)
    weights = []
    for cid in clients:
        old = aux.get(CLIENT_PREFIX + cid)
        w, e = participate(Entry(*old.tolist()) if old is not None else Entry(), rnd, cutoff)
        weights.append(w)
        aux[CLIENT_PREFIX + cid] = torch.tensor(e, dtype=torch.int64)
    return weights, aux


def entries(aux: Tensors, rnd: int, cutoff: int) -> dict[str, Entry]:
    """Every tracked client's estimator state after round `rnd` (for reports and tests)."""
    return {k[len(CLIENT_PREFIX):]: advance(Entry(*v.tolist()), rnd + 1, cutoff)
            for k, v in aux.items() if k.startswith(CLIENT_PREFIX)}


def server_update(theta: Tensors, models: list[Tensors], weights: list[float], divisor: float,
                  lr: float) -> Tensors:
    """theta + lr * sum_k (w_k / divisor) (models_k - theta), as one `weighted_average` of the models and theta.

    theta's coefficient 1 - lr * sum(w) / divisor is exactly 0 when the weights sum to the divisor at lr 1
    (fsum of small integers is exact); theta is then left out, which makes "every weight 1, everyone takes
    part" FedAvg bit for bit."""
    coefficients = [lr * w / divisor for w in weights]
    rest = 1.0 - lr * math.fsum(weights) / divisor
    if rest != 0.0:
        return weighted_average([*models, theta], [*coefficients, rest])
    return weighted_average(models, coefficients)


@dataclass
class FedAUOptions(Section):
    weighting: str = option("fedau", choices=WEIGHTINGS)  # fedau | participating (FedAvg: mean of participants)
    # | all (divide by N) | known (1/p)
    cutoff: int = option(0, ge=0)  # K: an absence of K rounds is recorded as an interval of K; 0: no cutoff
    num_clients: int = option(0, ge=0)  # N; 0: the run's clients (virtual clients, or the coordinator's registered)
    server_lr: float = option(1.0, ge=0)  # eta_g


class FedAU(StrategyBase):
    name = "fedau"
    Options = FedAUOptions
    Recipe = FedAvgRecipe
    privacy = Support(central_dp="FedAU multiplies a client's update by its participation weight (up to the cutoff "
                                 "K, or without bound), so one client's influence on the sum is not the clip C: "
                                 "use privacy.dp = 'client'")  # weights under secure aggregation: client_weights
    # weighting = "known" reads `known_probabilities`, the simulator's oracle (StrategyBase)

    def init_state(self, spec: ModelSpec) -> GlobalState:
        n = self.options.num_clients or self.settings.num_clients
        if n <= 0:
            raise ConfigError("FedAU needs the total number of clients N: register the clients before the run "
                              "starts or set strategy.num_clients")
        if self.options.weighting == "known" and self.known_probabilities is None:
            raise ConfigError("strategy.weighting = 'known' needs the true participation probabilities, which "
                              "only a simulation has (fedadapt simulate)")
        return GlobalState({k: v.clone() for k, v in spec.initial.items()},
                           {NUM_CLIENTS: torch.tensor([n], dtype=torch.int64)})

    def upload_contract(self, state: GlobalState) -> Contract:
        return contract_of(state.tensors)

    def aggregate(self, rnd: int, results: list[ClientResult], state: GlobalState) -> RoundOutcome:
        ids = [r.client_id for r in results]
        weights, divisor, aux = self._weights(rnd, ids, state.aux)
        theta = server_update(state.tensors, [r.tensors for r in results], weights, divisor, self.options.server_lr)
        metrics = {"participants": float(len(ids)), "num_clients": float(self._n(aux)),
                   "weight_mean": math.fsum(weights) / len(weights), "weight_max": max(weights),
                   "update_scale": math.fsum(weights) / divisor}
        return RoundOutcome(GlobalState(theta, aux, rnd), metrics)

    def client_weights(self, rnd: int, ids: list[str], state: GlobalState) -> dict[str, float]:
        """The weight of each of `ids` in round `rnd` if all of them take part. Under secure aggregation each
        client applies its own (privacy/secagg.py): the weight depends only on earlier rounds, so it is
        known when the task is sent, and the server then learns only the weighted sum."""
        return dict(zip(ids, self._weights(rnd, ids, state.aux)[0]))

    def _weights(self, rnd: int, ids: list[str], aux: Tensors) -> tuple[list[float], float, Tensors]:
        """The weights of the participants `ids`, the divisor, and the estimator state after the round."""
        estimated, aux = participation_weights(aux, rnd, ids, self.options.cutoff)
        weighting, n = self.options.weighting, self._n(aux)
        if weighting == "fedau":
            return estimated, n, aux
        if weighting == "participating":
            return [1.0] * len(ids), len(ids), aux
        if weighting == "all":
            return [1.0] * len(ids), n, aux
        return [1.0 / self._known(cid) for cid in ids], n, aux

    @staticmethod
    def _n(aux: Tensors) -> int:
        """N, which never counts fewer clients than have taken part (e.g. one registered after the start)."""
        return max(int(aux[NUM_CLIENTS]), sum(k.startswith(CLIENT_PREFIX) for k in aux))

    def _known(self, cid: str) -> float:
        p = (self.known_probabilities or {}).get(cid, 0.0)
        if not p > 0:
            raise ConfigError(f"strategy.weighting = 'known': no participation probability for client {cid!r}")
        return p
