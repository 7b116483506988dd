"""FedAvg-LoRA with zero-padding for heterogeneous ranks: the baseline FLoRA is compared with (ALGORITHMS.md §3.2).

The global adapter has the run's adapter.rank (the largest client rank). Client k trains the first r_k
rank components of it (the first r_k rows of A, the first r_k columns of B), and the server averages
every client's factors zero-padded back to the full rank. Like FedIT it averages A and B separately,
so the result is not the average of the products B_k A_k: that is the aggregation noise FLoRA removes.
Every client uses the run's scaling s = adapter.alpha / adapter.rank (alpha_k = s * r_k), unlike the
reference's zero-padding path, whose global alpha differs from the clients' (§3.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedadapt.core.codec import Contract, contract_of
from fedadapt.core.config import option
from fedadapt.models.lora_layers import factor_state, load_factors
from fedadapt.training.loop import train_config, train_local

from . import base
from .aggregate import weighted_average, weights
from .base import ClientResult, GlobalState, RoundOutcome, Task
from .lowrank import client_rank, factors_contract, global_factors, lora_modules


@dataclass
class ZeroPadOptions(base.Weighted):
    ranks: list[int] = option([], gt=0)  # r_k cycled over clients in id order; each <= adapter.rank


class ZeroPadRecipe(base.RecipeBase):
    """Client side: train the leading r_k components of the global adapter; send them back."""

    def prepare(self, model: torch.nn.Module, task: Task) -> None:
        run = model.encoder.peft_config["default"]  # the run's adapter: its scaling holds for every rank
        load_factors(model, task.tensors, run.lora_alpha / run.r, int(task.config.get("seed", 0)))

    def train(self, model: torch.nn.Module, data: Any, task: Task, privacy: Any = None) -> ClientResult:
        metrics = train_local(model, data, train_config(task.config), task.config["seed"])
        return ClientResult("", len(data), factor_state(model), metrics)


class ZeroPad(base.StrategyBase):
    name = "zeropad"
    Options = ZeroPadOptions
    Recipe = ZeroPadRecipe
    privacy = base.NO_PRIVACY.but(secure_aggregation="zero-padded heterogeneous LoRA averages factors of different "
                                                     "ranks per client")

    def init_state(self, spec: base.ModelSpec) -> GlobalState:
        self.modules = lora_modules(spec.initial)
        self.rank = next(iter(self.modules.values())).rank
        return GlobalState(global_factors(spec.initial, self.options.ranks))

    def export(self, tensors: base.Tensors, model: torch.nn.Module) -> base.Exported:
        """The global factors at the run's rank and scaling (every client's alpha_k / r_k is the run's)."""
        scaling = float(model.encoder.peft_config["default"].lora_alpha / self.rank)
        return base.Exported({m: (tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"], scaling) for m in self.modules},
                             params={k: v for k, v in tensors.items() if not k.endswith((".lora_A", ".lora_B"))})

    def configure(self, rnd: int, clients: list[base.ClientInfo], state: GlobalState) -> dict[str, Task]:
        payloads: dict[int, dict] = {}  # one per rank, so the engine encodes each once
        tasks = {}
        for c in base.sample_clients(clients, self.settings.clients_per_round, self.settings.seed, rnd):
            r = client_rank(c, clients, self.options.ranks or [self.rank])
            if r not in payloads:
                payloads[r] = {k: _truncate(k, v, r) for k, v in state.tensors.items()}
            tasks[c.client_id] = base.train_task(self.settings, rnd, c.client_id, payloads[r], zeropad_rank=r)
        return tasks

    def upload_contract(self, state: GlobalState) -> Contract:
        return contract_of(state.tensors)

    def task_contract(self, state: GlobalState, task: Task) -> Contract:
        return {**contract_of(state.tensors), **factors_contract(self.modules, int(task.config["zeropad_rank"]))}

    def aggregate(self, rnd: int, results: list[ClientResult], state: GlobalState) -> RoundOutcome:
        p = weights([r.num_examples for r in results], self.options.weighting)
        padded = [{k: _pad(k, v, self.rank) for k, v in r.tensors.items()} for r in results]
        return RoundOutcome(GlobalState(weighted_average(padded, p), {}, rnd), {})


def _truncate(name: str, t: torch.Tensor, r: int) -> torch.Tensor:
    if name.endswith(".lora_A"):
        return t[:r].clone()
    return t[:, :r].clone() if name.endswith(".lora_B") else t


def _pad(name: str, t: torch.Tensor, r: int) -> torch.Tensor:
    if name.endswith(".lora_A"):
        return torch.nn.functional.pad(t, (0, 0, 0, r - t.shape[0]))
    return torch.nn.functional.pad(t, (0, r - t.shape[1])) if name.endswith(".lora_B") else t
