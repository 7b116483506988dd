"""FLoRA (ALGORITHMS.md §3): exact aggregation of LoRA adapters of heterogeneous ranks by stacking.

Each round every selected client k trains a FRESH LoRA of its own rank r_k (scaling s_k = alpha_k / r_k)
on the current merged base W^t. The server stacks, per module,

    B_stack = [B_1 | B_2 | ...]              (m x R)      R = sum of the ranks actually received
    A_stack = [p_1 s_1 A_1 ; p_2 s_2 A_2 ...] (R x n)     p_k, s_k applied once, to A only

so B_stack A_stack = sum_k p_k s_k B_k A_k exactly, and every client merges W^{t+1} = W^t + B_stack A_stack.

The global model is the task head plus, per module, the cumulative merged delta D^t = W^t - W^0 (the
base W^0 is built identically everywhere). A client that missed rounds receives, whichever is fewer
bytes, the stacks of the rounds it missed or D^t itself; the per-round stacks live in GlobalState.aux
(pruned once they would cost more than D^t), so catch-up survives a coordinator restart. Products are
formed by `stack_delta` in a fixed order, so the server and every client hold bit-identical bases;
each task carries the hash of D^t, which the client checks before training.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from fedadapt.core.codec import Contract, contract_of
from fedadapt.core.config import option
from fedadapt.models.lora_layers import base_weights, factor_state, fresh_lora, load_named
from fedadapt.training.loop import train_config, train_local

from . import base
from .aggregate import weighted_average, weights
from .base import ClientResult, GlobalState, RoundOutcome, Task, Tensors
from .lowrank import (
    HeldBase,
    catch_up,
    client_rank,
    content_hash,
    factors_contract,
    hash_metric,
    head_of,
    known,
    lora_modules,
    nbytes,
    prune_history,
    remember,
    remember_silent,
)

DELTA = ".flora_delta"  # <module>.flora_delta: the cumulative merged delta D^t of a module
_STACK = re.compile(r"^stack/(?P<round>\d+)/(?P<module>.+)/(?P<factor>[AB])$")  # stack/<round>/<module>/A|B
PRUNED = "flora/pruned"  # stacks of rounds <= this were dropped: clients older than it get D^t


# ---------------------------------------------------------------------------------------- pure maths
def stack(factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]], p: list[float], s: list[float]
          ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module (A_stack, B_stack) from each client's {module: (A_k, B_k)}, in the given client order."""
    return {m: (torch.cat([pk * sk * f[m][0] for f, pk, sk in zip(factors, p, s)], dim=0),
                torch.cat([f[m][1] for f in factors], dim=1))
            for m in factors[0]}


def stack_delta(a_stack: torch.Tensor, b_stack: torch.Tensor) -> torch.Tensor:
    """B_stack @ A_stack in fp64, one rank-1 term at a time in a fixed order.

    A BLAS matmul may sum in an order that depends on threads and CPU; these elementwise steps do not,
    and for fp32 factors each product is exact in fp64. So server and clients get the same bits.
    """
    a, b = a_stack.double(), b_stack.double()
    out = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64)
    for j in range(a.shape[0]):
        out.addcmul_(b[:, j : j + 1], a[j : j + 1, :])
    return out


def add_delta(d: torch.Tensor, delta64: torch.Tensor) -> torch.Tensor:
    """D + delta, rounded once to D's dtype (the one place the merged delta accumulates)."""
    return (d.double() + delta64).to(d.dtype)


def naive_delta(factors: list[tuple[torch.Tensor, torch.Tensor]], p: list[float], s: list[float]) -> torch.Tensor:
    """What FedAvg of A and B gives (FedIT; zero-padded to the largest rank): (sum p s B)(sum p A)."""
    r = max(a.shape[0] for a, _ in factors)
    a_avg = sum(pk * torch.nn.functional.pad(a.double(), (0, 0, 0, r - a.shape[0])) for (a, _), pk in zip(factors, p))
    b_avg = sum(pk * sk * torch.nn.functional.pad(b.double(), (0, r - b.shape[1])) for (_, b), pk, sk in
                zip(factors, p, s))
    return b_avg @ a_avg


# ---------------------------------------------------------------------------------------- server
@dataclass
class FloraOptions(base.Weighted):  # p_k over the round's clients
    ranks: list[int] = option([], gt=0)  # r_k cycles over clients in id order; empty: adapter.rank
    alpha_per_rank: float = option(2.0, gt=0)  # alpha_k = alpha_per_rank * r_k, so s_k = alpha_per_rank (ref: 2)


class FloraRecipe(base.RecipeBase):
    """Client side: bring the base up to date, train a fresh LoRA of the task's rank, send A and B."""

    def __init__(self) -> None:
        self._bases = base.PerModel(_Base)

    def prepare(self, model: torch.nn.Module, task: Task) -> None:
        self.catchup = self._bases(model).sync(task)
        load_named(model, {k: v for k, v in task.tensors.items() if not k.endswith(DELTA) and not _STACK.match(k)})
        default = model.encoder.peft_config["default"].r
        rank = int(task.config.get("flora_rank", default))
        fresh_lora(model, rank, float(task.config.get("flora_alpha", 2.0 * rank)), int(task.config.get("seed", 0)))
        self.base_hash = hash_metric(content_hash(base_weights(model)))

    def train(self, model: torch.nn.Module, data: Any, task: Task, privacy: Any = None) -> ClientResult:
        metrics = train_local(model, data, train_config(task.config), task.config["seed"])
        metrics |= {**self.catchup, "base_hash": self.base_hash}
        return ClientResult("", len(data), factor_state(model), metrics)


class _Base(HeldBase):
    """A model's merged base: W = W^0 + D^v."""

    key, dense, noun, steps, history = "flora", DELTA, "merged delta", "stack", _STACK

    def fold(self, d: torch.Tensor, tensors: Tensors, rnd: int, module: str) -> torch.Tensor:
        return add_delta(d, stack_delta(tensors[f"stack/{rnd}/{module}/A"], tensors[f"stack/{rnd}/{module}/B"]))

    def sync(self, task: Task) -> dict[str, float]:
        done = super().sync(task)
        with torch.no_grad():
            for m, w in self.weights.items():
                w.copy_(self.w0[m] + self.delta[m].to(w.dtype))
        return done


class Flora(base.StrategyBase):
    name = "flora"
    Options = FloraOptions
    Recipe = FloraRecipe
    privacy = base.NO_PRIVACY.but(secure_aggregation="FLoRA stacks every client's own LoRA factors B_k, A_k (their "
                                  "sum is not the update), so the server must see each client's factors individually")
    _asked: tuple[int, set[str]] = (0, set())  # (round, clients asked in it): set by configure

    def init_state(self, spec: base.ModelSpec) -> GlobalState:
        self.modules = lora_modules(spec.initial)
        head = {k: v.clone() for k, v in head_of(spec.initial).items()}
        deltas = {m + DELTA: torch.zeros(i.out_features, i.in_features, dtype=i.dtype) for m, i in self.modules.items()}
        return GlobalState({**head, **deltas}, {PRUNED: torch.tensor(0, dtype=torch.int64)})

    def _catch_up(self, state: GlobalState, version: int) -> Tensors:
        """What a client whose base is D^version needs: the stacks since, or D^t, whichever is smaller."""
        return catch_up(state, version, DELTA, _STACK, PRUNED)

    def configure(self, rnd: int, clients: list[base.ClientInfo], state: GlobalState) -> dict[str, Task]:
        chosen = base.sample_clients(clients, self.settings.clients_per_round, self.settings.seed, rnd)
        self._asked = (rnd, {c.client_id for c in chosen})  # a hint for aggregate (below); not state
        head = {k: v for k, v in state.tensors.items() if not k.endswith(DELTA)}
        base_hash = content_hash({m: state.tensors[m + DELTA] for m in self.modules})
        payloads: dict[int, Tensors] = {}  # one dict per base version: the engine encodes each once
        tasks = {}
        for c in chosen:
            version = known(state.aux, c.client_id, "base", 0)  # a fresh client holds W^0 = version 0; -1: unknown
            if version not in payloads:
                payloads[version] = {**head, **self._catch_up(state, version)}
            r = client_rank(c, clients, self.options.ranks or [next(iter(self.modules.values())).rank])
            tasks[c.client_id] = base.train_task(self.settings, rnd, c.client_id, payloads[version], flora_rank=r,
                                            flora_alpha=self.options.alpha_per_rank * r, flora_base_round=state.round,
                                            flora_base_hash=base_hash, flora_from=version)
        return tasks

    def upload_contract(self, state: GlobalState) -> Contract:
        return self._contract(state, next(iter(self.modules.values())).rank)

    def task_contract(self, state: GlobalState, task: Task) -> Contract:
        return self._contract(state, int(task.config["flora_rank"]))

    def _contract(self, state: GlobalState, rank: int) -> Contract:
        head = contract_of({k: v for k, v in state.tensors.items() if not k.endswith(DELTA)})
        return {**head, **factors_contract(self.modules, rank)}

    def export(self, tensors: Tensors, model: torch.nn.Module) -> base.Exported:
        """The cumulative merged delta D^t of each module is a change of its base weight (the stacks multiply out
        to it); the head is a parameter."""
        return base.Exported(base_delta={m: tensors[m + DELTA] for m in self.modules},
                             params={k: v for k, v in tensors.items() if not k.endswith(DELTA)})

    def aggregate(self, rnd: int, results: list[ClientResult], state: GlobalState) -> RoundOutcome:
        p = weights([r.num_examples for r in results], self.options.weighting)
        s = [self.options.alpha_per_rank] * len(results)  # s_k = alpha_k / r_k
        head_names = [k for k in state.tensors if not k.endswith(DELTA)]
        tensors = weighted_average([{k: r.tensors[k] for k in head_names} for r in results], p) if head_names else {}
        factors = [{m: (r.tensors[f"{m}.lora_A"], r.tensors[f"{m}.lora_B"]) for m in self.modules} for r in results]
        aux = dict(state.aux)
        err2 = norm2 = 0.0
        for m, (a, b) in stack(factors, p, s).items():
            exact = stack_delta(a, b)
            tensors[m + DELTA] = add_delta(state.tensors[m + DELTA], exact)
            aux[f"stack/{rnd}/{m}/A"], aux[f"stack/{rnd}/{m}/B"] = a, b
            err2 += float((naive_delta([f[m] for f in factors], p, s) - exact).pow(2).sum())
            norm2 += float(exact.pow(2).sum())
        remember(aux, [r.client_id for r in results], "base", state.round)
        remember_silent(aux, self._asked, rnd, results, "base", -1)  # unknown base: it gets D, which fits any
        prune_history(aux, _STACK, PRUNED, nbytes({k: v for k, v in tensors.items() if k.endswith(DELTA)}))
        hashes = {r.metrics["base_hash"] for r in results if "base_hash" in r.metrics}
        metrics = {
            "global_rank": float(sum(f[next(iter(self.modules))][0].shape[0] for f in factors)),
            "exactness_error": math.sqrt(err2),  # ||naive FedAvg of A, B - exact||_F over all modules
            "exactness_error_rel": math.sqrt(err2 / norm2) if norm2 > 0 else 0.0,
            "base_hashes_distinct": float(len(hashes)),  # 1: every client trained on the same base
            "base_hash": hashes.pop() if len(hashes) == 1 else -1.0,
            "catchup_dense": sum(r.metrics.get("catchup_dense", 0.0) for r in results),
            "catchup_stack_rounds": sum(r.metrics.get("catchup_stack_rounds", 0.0) for r in results),
        }
        return RoundOutcome(GlobalState(tensors, aux, rnd), metrics)
