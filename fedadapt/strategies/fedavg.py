"""FedAvg of adapter tensors (ALGORITHMS.md §1): example-weighted or uniform, with an optional server
learning rate and server momentum (FedAvgM).

    avg = sum_k p_k theta_k                   p_k = n_k / sum_j n_j  (or 1/|S|)
    g   = theta - avg                         pseudo-gradient (minus the mean delta)
    v   = beta * v + g                        v starts at 0, so round 1 has v = g (as Flower)
    theta <- theta - eta_g * v

With eta_g = 1 and beta = 0 the result is `avg` itself, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedadapt.core.codec import Contract, contract_of
from fedadapt.core.config import option
from fedadapt.models.adapters import adapter_state, load_adapter_state
from fedadapt.privacy.compat import Support
from fedadapt.training.loop import train_config, train_local

from .aggregate import weighted_average, weights
from .base import ClientResult, GlobalState, ModelSpec, RecipeBase, RoundOutcome, StrategyBase, Task, Tensors, Weighted


def server_step(theta: Tensors, avg: Tensors, velocity: Tensors, lr: float, momentum: float) -> tuple[Tensors, Tensors]:
    """FedAvgM step from the average; returns (new theta, new velocity)."""
    if lr == 1.0 and momentum == 0.0:
        return avg, {}
    new_theta, new_v = {}, {}
    for name, t in theta.items():
        if not t.is_floating_point():
            new_theta[name] = avg[name]
            continue
        g = t - avg[name]
        v = g if name not in velocity or momentum == 0.0 else velocity[name] * momentum + g
        new_v[name] = v
        new_theta[name] = t - lr * v
    return new_theta, (new_v if momentum else {})


@dataclass
class FedAvgOptions(Weighted):
    server_lr: float = option(1.0, ge=0)
    server_momentum: float = option(0.0, ge=0, lt=1)


class FedAvgRecipe(RecipeBase):
    """Client side: load the global adapter, train it locally, send the whole adapter back."""

    def prepare(self, model: torch.nn.Module, task: Task) -> None:
        load_adapter_state(model, task.tensors)

    def train(self, model: torch.nn.Module, data: Any, task: Task, privacy: Any = None) -> ClientResult:
        trainer = train_local if privacy is None else privacy.train_local  # DP-SGD (fedadapt.privacy)
        metrics = trainer(model, data, train_config(task.config), task.config["seed"])
        # the transport knows who this client is and stamps the result; the recipe does not need to
        return ClientResult("", len(data), adapter_state(model), metrics)


class FedAvg(StrategyBase):
    name = "fedavg"
    Options = FedAvgOptions
    Recipe = FedAvgRecipe
    privacy = Support()  # DP-SGD on the clients, clipped and noised updates on the server, masked sums

    def init_state(self, spec: ModelSpec) -> GlobalState:
        return GlobalState({k: v.clone() for k, v in spec.initial.items()})

    def upload_contract(self, state: GlobalState) -> Contract:
        return contract_of(state.tensors)

    def aggregate(self, rnd: int, results: list[ClientResult], state: GlobalState) -> RoundOutcome:
        p = weights([r.num_examples for r in results], self.options.weighting)
        avg = weighted_average([r.tensors for r in results], p)
        velocity = {k[len("momentum/"):]: v for k, v in state.aux.items() if k.startswith("momentum/")}
        theta, velocity = server_step(state.tensors, avg, velocity, self.options.server_lr,
                                      self.options.server_momentum)
        aux = {f"momentum/{k}": v for k, v in velocity.items()}
        return RoundOutcome(GlobalState(theta, aux, rnd), {})
