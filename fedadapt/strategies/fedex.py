"""FedEx-LoRA (ALGORITHMS.md §9): average A and B as FedAvg does, and fold what that misses into the frozen base.

Every client of round t starts from the same (W0^t, B^t, A^t) per module and trains B and A. The server forms

    B^{t+1} = sum_i p_i B_i        A^{t+1} = sum_i p_i A_i
    Res     = sum_i p_i B_i A_i - B^{t+1} A^{t+1}
    D^{t+1} = D^t + Res            (the base is W0^t = W0 + s D^t)

so W0 + s (D^{t+1} + B^{t+1} A^{t+1}) = sum_i p_i (W0 + s (D^t + B_i A_i)): the global model is exactly the
weighted mean of the clients' models, and the next round warm-starts from the averaged factors (not a fresh
LoRA, unlike FLoRA). D is kept in the factors' units, so the server needs no scaling s: a client applies
W0 + s D with its adapter's s = alpha / r.

The residual of a round is sent low rank and exact: the stacks A = [A_1; ...; A_k; A^{t+1}],
B = [B_1 | ... | B_k | B^{t+1}] with per-row weights w = (p_1 .. p_k, -1), so Res = sum_j w_j B[:, j] A[j, :]
(rank <= (k+1) r, k r (m + n) + r (m + n) numbers against m n dense). A client that missed rounds receives,
whichever is fewer bytes, the residual stacks of the rounds it missed or D^t itself; the stacks live in
GlobalState.aux (pruned once they cost more than D^t), so catch-up survives a coordinator restart. D is
formed by the same fixed-order fp64 sum on the server and on every client (flora.stack_delta), so their bases
are bit-identical; each task carries the hash of D^t, which the client checks before training.

Mixed ranks (`ranks`): the global adapter has the run's adapter.rank r. A client of rank r_k < r trains the
first r_k components; the other components of the global factors stay frozen in its model, folded into its
working base weights for the round (W0 + s (D + B^t_{:, r_k:} A^t_{r_k:, :})). The server counts those frozen
components as the client's own (each client's full factors are its trained ones with the global tail), so
the averages and the residual, and hence exactness, are unchanged.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from fedadapt.core.codec import Contract, TensorSpec, contract_of
from fedadapt.core.config import option
from fedadapt.core.errors import PayloadError
from fedadapt.models.lora_layers import factor_state, load_factors
from fedadapt.privacy.compat import Support
from fedadapt.training.loop import train_config, train_local

from . import base
from .aggregate import weighted_average, weights
from .base import ClientResult, GlobalState, RoundOutcome, Task, Tensors
from .flora import add_delta, stack_delta
from .lowrank import (
    HeldBase,
    catch_up,
    client_rank,
    content_hash,
    exported_factors,
    factors_contract,
    global_factors,
    hash_metric,
    known,
    lora_modules,
    nbytes,
    prune_history,
    remember,
    remember_silent,
)

BASE = ".fedex_base"  # <module>.fedex_base: the folded residuals D^t of a module (m x n, factor units)
PRODUCT = ".fedex_product"  # secure aggregation: a client's dense B_k A_k (with its frozen tail)
_RESID = re.compile(r"^resid/(?P<round>\d+)/(?P<rest>.+)$")  # resid/<round>/<module>/A|B and resid/<round>/w
PRUNED = "fedex/pruned"  # residual stacks of rounds <= this were dropped: clients older than it get D^t


# ---------------------------------------------------------------------------------------- pure maths
def full_factors(a: torch.Tensor, b: torch.Tensor, a_glob: torch.Tensor, b_glob: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's factors at the global rank: its trained r_k components, then the global ones it held frozen."""
    r = a.shape[0]
    return torch.cat([a, a_glob[r:]], dim=0), torch.cat([b, b_glob[:, r:]], dim=1)


def residual_stack(factors: list[tuple[torch.Tensor, torch.Tensor]], p: list[float], a_avg: torch.Tensor,
                   b_avg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, w) with sum_j w_j B[:, j] A[j, :] = sum_i p_i B_i A_i - b_avg a_avg, from each client's (A_i, B_i)
    at one rank, in the given client order; w is fp64 (p_i for client i's rows, -1 for the averages')."""
    r = a_avg.shape[0]
    a = torch.cat([f[0] for f in factors] + [a_avg], dim=0)
    b = torch.cat([f[1] for f in factors] + [b_avg], dim=1)
    w = torch.tensor([pk for pk in p for _ in range(r)] + [-1.0] * r, dtype=torch.float64)
    return a, b, w


def residual(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_j w_j B[:, j] A[j, :] in fp64, in a fixed order: the same bits on the server and every client."""
    return stack_delta(a.double() * w[:, None], b)


def fold(d: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """D + Res, rounded once to D's dtype."""
    return add_delta(d, residual(a, b, w))


# ---------------------------------------------------------------------------------------- client
@dataclass
class FedExOptions(base.Weighted):  # p_i over the round's clients, the same for B, A and the residual
    ranks: list[int] = option([], gt=0)  # r_k cycled over the clients in id order, each <= adapter.rank; empty:
    # every client trains the run's adapter.rank
    alpha_per_rank: float = option(0.0, ge=0)  # the scaling s of every rank (alpha_k = s r_k, as FLoRA's option);
    # 0: the run's adapter.alpha / adapter.rank


class FedExRecipe(base.RecipeBase):
    """Client side: bring the folded base up to date, warm-start from the averaged factors, train, send A and B."""

    def __init__(self) -> None:
        self._bases = base.PerModel(_Base)

    def prepare(self, model: torch.nn.Module, task: Task) -> None:
        t = task.tensors
        held = self._bases(model)
        self.catchup = held.sync(task)
        run = model.encoder.peft_config["default"]
        s = float(task.config.get("fedex_scaling", run.lora_alpha / run.r))  # the same at every rank (alpha_k = s r_k)
        factors = {k: v for k, v in t.items() if k.endswith((".lora_A", ".lora_B"))}
        full = next(v.shape[0] for k, v in sorted(factors.items()) if k.endswith(".lora_A"))
        r = int(task.config.get("fedex_rank", full))
        if not 0 < r <= full:
            raise PayloadError(f"task asks for rank {r}, but the global factors have rank {full}")
        tails = {m: (t[m + ".lora_A"][r:], t[m + ".lora_B"][:, r:]) for m in held.delta} if r < full else {}
        held.apply(s, tails)
        mine = {k: (v[:r] if k.endswith(".lora_A") else v[:, :r]) for k, v in factors.items()}
        rest = {k: v for k, v in t.items() if k not in factors and not k.endswith(BASE) and not _RESID.match(k)}
        load_factors(model, {**rest, **mine}, s, int(task.config.get("seed", 0)))
        self.base_hash = hash_metric(content_hash(held.delta))

    def train(self, model: torch.nn.Module, data: Any, task: Task, privacy: Any = None) -> ClientResult:
        trainer = train_local if privacy is None else privacy.train_local  # DP-SGD on A, B and the head
        metrics = trainer(model, data, train_config(task.config), task.config["seed"])
        metrics |= {**self.catchup, "base_hash": self.base_hash}
        return ClientResult("", len(data), factor_state(model), metrics)

    def summand(self, uploads: Tensors, task: Task, weight: float) -> tuple[Tensors, float]:
        """Secure aggregation: the factors at the global rank and their dense product, so that the masked sum
        holds sum w B_i, sum w A_i and sum w B_i A_i (the head as it is)."""
        out = {}
        for k, v in uploads.items():
            if not k.endswith(".lora_A"):
                continue
            m = k[: -len(".lora_A")]
            a, b = full_factors(v, uploads[m + ".lora_B"], task.tensors[k], task.tensors[m + ".lora_B"])
            out[m + ".lora_A"], out[m + ".lora_B"] = a, b
            out[m + PRODUCT] = (b.double() @ a.double()).to(v.dtype)
        return {**{k: v for k, v in uploads.items() if not k.endswith((".lora_A", ".lora_B"))}, **out}, weight


class _Base(HeldBase):
    """A model's folded base: W = W0 + s (D^v + the frozen tail of the round), recomputed from W0, never drifted."""

    key, dense, noun, steps, history = "fedex", BASE, "folded base", "residual", _RESID

    def fold(self, d: torch.Tensor, tensors: Tensors, rnd: int, module: str) -> torch.Tensor:
        resid = f"resid/{rnd}/"
        return fold(d, tensors[f"{resid}{module}/A"], tensors[f"{resid}{module}/B"], tensors[resid + "w"])

    def apply(self, s: float, tails: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Set the live base weights to W0 + s (D + B_tail A_tail), rounded once."""
        with torch.no_grad():
            for m, w in self.weights.items():
                d = self.delta[m].double()
                if m in tails:
                    a, b = tails[m]
                    d = d + b.double() @ a.double()
                w.copy_((self.w0[m].double() + s * d).to(w.dtype))


# ---------------------------------------------------------------------------------------- server
CENTRAL = ("central DP releases a clipped, noised mean of each client's uploaded tensors, but FedEx-LoRA's "
           "residual needs every client's own product B_i A_i, which that release does not carry")


class FedEx(base.StrategyBase):
    name = "fedex-lora"
    Options = FedExOptions
    Recipe = FedExRecipe
    # Client DP: A and B train by DP-SGD and the server only post-processes them. Secure aggregation: the three
    # sums sum p B_i, sum p A_i and sum p B_i A_i are masked, each client uploading its dense product (m x n per
    # module, as much as full fine-tuning of the adapted matrices; summand below).
    privacy = Support(central_dp=CENTRAL)
    _asked: tuple[int, set[str]] = (0, set())  # (round, clients asked in it): set by configure

    def init_state(self, spec: base.ModelSpec) -> GlobalState:
        self.modules = lora_modules(spec.initial)
        self.rank = next(iter(self.modules.values())).rank
        tensors = global_factors(spec.initial, self.options.ranks)
        for m, i in self.modules.items():
            tensors[m + BASE] = torch.zeros(i.out_features, i.in_features, dtype=i.dtype)
        return GlobalState(tensors, {PRUNED: torch.tensor(0, dtype=torch.int64)})

    def _catch_up(self, state: GlobalState, version: int) -> Tensors:
        """What a client whose base is D^version needs: the residual stacks since, or D^t, whichever is smaller."""
        return catch_up(state, version, BASE, _RESID, PRUNED)

    def configure(self, rnd: int, clients: list[base.ClientInfo], state: GlobalState) -> dict[str, Task]:
        chosen = base.sample_clients(clients, self.settings.clients_per_round, self.settings.seed, rnd)
        self._asked = (rnd, {c.client_id for c in chosen})  # a hint for aggregate (below); not state
        light = {k: v for k, v in state.tensors.items() if not k.endswith(BASE)}  # head and the warm start
        base_hash = content_hash({m: state.tensors[m + BASE] for m in self.modules})
        payloads: dict[int, Tensors] = {}  # one dict per base version: the engine encodes each once
        tasks = {}
        for c in chosen:
            version = known(state.aux, c.client_id, "base", 0)  # a fresh client holds W0 (version 0); -1: unknown
            if version not in payloads:
                payloads[version] = {**light, **self._catch_up(state, version)}
            r = client_rank(c, clients, self.options.ranks or [self.rank])
            scaling = {"fedex_scaling": self.options.alpha_per_rank} if self.options.alpha_per_rank else {}
            tasks[c.client_id] = base.train_task(self.settings, rnd, c.client_id, payloads[version], fedex_rank=r,
                                                 fedex_base_round=state.round, fedex_base_hash=base_hash,
                                                 fedex_from=version, **scaling)
        return tasks

    def _head_contract(self, state: GlobalState) -> Contract:
        return contract_of({k: v for k, v in state.tensors.items() if k in head_names(state)})

    def upload_contract(self, state: GlobalState) -> Contract:
        return {**self._head_contract(state), **factors_contract(self.modules, self.rank)}

    def task_contract(self, state: GlobalState, task: Task) -> Contract:
        return {**self._head_contract(state), **factors_contract(self.modules, int(task.config["fedex_rank"]))}

    def sum_contract(self, state: GlobalState) -> Contract:
        products = {m + PRODUCT: TensorSpec((i.out_features, i.in_features), i.dtype) for m, i in self.modules.items()}
        return {**self.upload_contract(state), **products}

    def aggregate(self, rnd: int, results: list[ClientResult], state: GlobalState) -> RoundOutcome:
        p = weights([r.num_examples for r in results], self.options.weighting)
        heads = head_names(state)
        tensors = weighted_average([{k: r.tensors[k] for k in heads} for r in results], p) if heads else {}
        aux = dict(state.aux)
        res2 = upd2 = 0.0
        w = None
        for m in self.modules:
            a_glob, b_glob = state.tensors[m + ".lora_A"], state.tensors[m + ".lora_B"]
            factors = [full_factors(r.tensors[m + ".lora_A"], r.tensors[m + ".lora_B"], a_glob, b_glob)
                       for r in results]
            avg = weighted_average([{"A": a, "B": b} for a, b in factors], p)
            a_stack, b_stack, w = residual_stack(factors, p, avg["A"], avg["B"])
            res = residual(a_stack, b_stack, w)
            tensors[m + BASE] = add_delta(state.tensors[m + BASE], res)
            tensors[m + ".lora_A"], tensors[m + ".lora_B"] = avg["A"], avg["B"]
            aux[f"resid/{rnd}/{m}/A"], aux[f"resid/{rnd}/{m}/B"] = a_stack, b_stack
            res2 += float(res.pow(2).sum())
            moved = avg["B"].double() @ avg["A"].double() - b_glob.double() @ a_glob.double()
            upd2 += float((res + moved).pow(2).sum())  # sum p B_i A_i - B^t A^t: the round's exact update
        aux[f"resid/{rnd}/w"] = w
        return RoundOutcome(*self._finish(rnd, results, state, tensors, aux, res2, upd2))

    def aggregate_sum(self, rnd: int, total: Tensors, weight: float, results: list[ClientResult],
                      state: GlobalState) -> RoundOutcome:
        """Secure aggregation: the round from sum w B_i, sum w A_i, sum w B_i A_i alone. Its residual is dense (the
        clients' own factors stay hidden), so no stack is kept for it: clients older than it get D^t."""
        heads = head_names(state)
        mean = {k: v / weight for k, v in total.items()}
        tensors = {k: mean[k].to(state.tensors[k].dtype) for k in heads}
        aux = dict(state.aux)
        res2 = upd2 = 0.0
        for m, i in self.modules.items():
            a, b = mean[m + ".lora_A"].to(i.dtype), mean[m + ".lora_B"].to(i.dtype)
            res = mean[m + PRODUCT] - b.double() @ a.double()
            tensors[m + BASE] = add_delta(state.tensors[m + BASE], res)
            tensors[m + ".lora_A"], tensors[m + ".lora_B"] = a, b
            res2 += float(res.pow(2).sum())
            a_glob, b_glob = state.tensors[m + ".lora_A"], state.tensors[m + ".lora_B"]
            upd2 += float((mean[m + PRODUCT] - b_glob.double() @ a_glob.double()).pow(2).sum())
        for k in [k for k in aux if _RESID.match(k)]:
            del aux[k]
        aux[PRUNED] = torch.tensor(rnd, dtype=torch.int64)
        return RoundOutcome(*self._finish(rnd, results, state, tensors, aux, res2, upd2, prune=False))

    def _finish(self, rnd: int, results: list[ClientResult], state: GlobalState, tensors: Tensors, aux: Tensors,
                res2: float, upd2: float, prune: bool = True) -> tuple[GlobalState, dict[str, float]]:
        remember(aux, [r.client_id for r in results], "base", state.round)
        remember_silent(aux, self._asked, rnd, results, "base", -1)  # unknown base: it gets D, which fits any
        if prune:
            prune_history(aux, _RESID, PRUNED, nbytes({k: v for k, v in tensors.items() if k.endswith(BASE)}))
        hashes = {r.metrics["base_hash"] for r in results if "base_hash" in r.metrics}
        metrics = {
            "residual_norm": math.sqrt(res2),  # ||sum p B_i A_i - B^{t+1} A^{t+1}||_F (factor units), all modules
            "residual_rel": math.sqrt(res2 / upd2) if upd2 > 0 else 0.0,  # of the round's exact update: what
            # averaging A and B alone (FedIT) would have got wrong
            "base_hashes_distinct": float(len(hashes)),  # 1: every client trained on the same folded base
            "base_hash": hashes.pop() if len(hashes) == 1 else -1.0,
            "catchup_dense": sum(r.metrics.get("catchup_dense", 0.0) for r in results),
            "catchup_residual_rounds": sum(r.metrics.get("catchup_residual_rounds", 0.0) for r in results),
        }
        return GlobalState(tensors, aux, rnd), metrics

    def export(self, tensors: Tensors, model: torch.nn.Module) -> base.Exported:
        """W0 + s (D + B A): a plain LoRA (B, A) at s on a base changed by s D; the head as is."""
        return exported_factors(tensors, model, self.options.alpha_per_rank, BASE)


def head_names(state: GlobalState) -> list[str]:
    """The global tensors that are neither LoRA factors nor folded bases (the task head)."""
    return [k for k in state.tensors if not k.endswith((".lora_A", ".lora_B", BASE))]

