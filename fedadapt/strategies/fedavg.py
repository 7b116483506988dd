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

from fedadapt.client.trainer import evaluate, train_config, train_local
from fedadapt.core.codec import Contract, contract_of
from fedadapt.core.errors import ConfigError
from fedadapt.models.adapters import adapter_state, load_adapter_state

from .base import ClientResult, GlobalState, ModelSpec, RoundOutcome, StrategyBase, Task, Tensors, register


def weights(num_examples: list[int], weighting: str) -> list[float]:
    """Normalised aggregation weights p_k (sum to 1)."""
    if weighting == "uniform":
        return [1.0 / len(num_examples)] * len(num_examples)
    total = sum(num_examples)
    return [n / total for n in num_examples]


# Tensors are averaged in batches of about this many bytes: each client's contribution to a batch is one
# torch._foreach_add_ call instead of one Python-level add_ per tensor, and a batch's accumulators are small
# enough to stay in the CPU cache while all clients are added to them.
_BATCH_BYTES = 4 * 1024 * 1024


def weighted_average(models: list[Tensors], p: list[float]) -> Tensors:
    """sum_k p_k * models[k], per tensor, accumulated in place in the tensors' own dtype.

    Non-float tensors (counters, e.g. BatchNorm's num_batches_tracked) cannot be averaged: the first
    client's value is taken.

    Per tensor this is exactly `acc = models[0][name] * p_0; acc.add_(models[k][name], alpha=p_k)` for
    k = 1, 2, ..., so the result is the same bit for bit; the only allocation is the output tensor, and
    no temporaries are made. Consecutive float tensors are processed in batches of about `_BATCH_BYTES`
    through the `torch._foreach_*` ops (one dispatch per client and batch rather than per client and
    tensor), which matters for adapters made of many small tensors.
    """
    first_model = models[0]
    rest = list(zip(models[1:], p[1:]))
    out: Tensors = {}
    batch: list[str] = []
    batch_bytes = 0

    def flush() -> None:
        accs = torch._foreach_mul([first_model[n] for n in batch], p[0])
        for m, w in rest:
            torch._foreach_add_(accs, [m[n] for n in batch], alpha=w)
        out.update(zip(batch, accs))
        batch.clear()

    for name, first in first_model.items():
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        nbytes = first.numel() * first.element_size()
        if batch and batch_bytes + nbytes > _BATCH_BYTES:
            flush()
            batch_bytes = 0
        batch.append(name)
        batch_bytes += nbytes
    if batch:
        flush()
    return {name: out[name] for name in first_model}


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
class FedAvgOptions:
    weighting: str = "examples"  # "examples" (n_k) or "uniform"
    server_lr: float = 1.0
    server_momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.weighting not in ("examples", "uniform"):
            raise ConfigError(f"strategy.weighting must be 'examples' or 'uniform', got {self.weighting!r}")
        if self.server_lr < 0 or not 0 <= self.server_momentum < 1:
            raise ConfigError("strategy.server_lr must be >= 0 and strategy.server_momentum in [0, 1)")


class FedAvgRecipe:
    """Client side: load the global adapter, train it locally, send the whole adapter back."""

    def prepare(self, model: torch.nn.Module, task: Task) -> None:
        load_adapter_state(model, task.tensors)

    def train(self, model: torch.nn.Module, data: Any, task: Task, privacy: Any = None) -> ClientResult:
        trainer = train_local if privacy is None else privacy.train_local  # DP-SGD (fedadapt.privacy)
        metrics = trainer(model, data, train_config(task.config), task.config["seed"])
        # the transport knows who this client is and stamps the result; the recipe does not need to
        return ClientResult("", len(data), adapter_state(model), metrics)

    def evaluate(self, model: torch.nn.Module, data: Any, task: Task) -> dict[str, float]:
        return evaluate(model, data, int(task.config.get("batch_size", 128)))


@register("fedavg", FedAvgRecipe)
class FedAvg(StrategyBase):
    Options = FedAvgOptions

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
