"""FlexLoRA (ALGORITHMS.md §11): clients of different ranks; the server averages the full products and gives
each client the best approximation of the average at its own rank.

Client k trains a LoRA of rank r_k (scaling s = adapter.alpha / adapter.rank, or `alpha_per_rank`, for every rank:
alpha_k = s r_k; the reference keeps alpha fixed instead, s_k = alpha / r_k)
and uploads B_k, A_k. Per module the server forms

    dW = sum_k p_k B_k A_k                   (factor units: the global model is W0 + s dW)
    dW = U S V^T                             (exact SVD, rank <= R = sum_k r_k)

and keeps the global adapter B = U S, A = V^T of rank min(R, m, n): the global model is exactly the
weighted mean of the clients' models. Client k's next task carries the first r_k components of B and A:
s B_{:, :r_k} A_{:r_k, :} = s U_r S_r V_r^T, the best rank-r_k approximation (Eckart-Young); what it drops
is reported per round (`truncation_error_rel`, for the smallest rank of the round). All of S goes into B
and A has orthonormal rows, as in the reference. The SVD is computed once, on the server, in fp64 and
without forming dW: QR of B_stack and of A_stack^T, then the SVD of the small R x R core (the dense SVD when
R >= min(m, n)). Clients never recompute it (SVD signs are arbitrary), so every party holds the same factors.

A client whose rank exceeds the global adapter's (the first round, where the global adapter is the run's
peft init) pads with its own fresh components: random A rows and zero B columns, which leave its model equal
to the global one. Nothing else is kept between rounds: the global factors are the whole state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fedadapt.core.codec import Contract, TensorSpec, contract_of
from fedadapt.core.config import option
from fedadapt.models.lora_layers import factor_state, fresh_lora, load_named, lora_layers
from fedadapt.privacy.compat import Support
from fedadapt.training.loop import train_config, train_local

from . import base
from .aggregate import weighted_average, weights
from .base import ClientResult, GlobalState, RoundOutcome, Task, Tensors
from .lowrank import client_rank, exported_factors, factors_contract, head_of, lora_modules

PRODUCT = ".flexlora_product"  # secure aggregation: a client's dense B_k A_k


# ---------------------------------------------------------------------------------------- pure maths
def product_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of b @ a (b: m x R, a: R x n) in fp64, with q = min(R, m, n) components, largest first."""
    b, a = b.double(), a.double()
    m, rank, n = b.shape[0], b.shape[1], a.shape[1]
    if rank >= min(m, n):
        return torch.linalg.svd(b @ a, full_matrices=False)
    qb, rb = torch.linalg.qr(b)  # b = qb rb, a^T = qa ra: b a = qb (rb ra^T) qa^T
    qa, ra = torch.linalg.qr(a.T)
    uc, s, vch = torch.linalg.svd(rb @ ra.T)
    return qb @ uc, s, vch @ qa.T


def redistribute(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of the best rank-`rank` approximation: B = U_r S_r, A = V_r^T (B A = U_r S_r V_r^T)."""
    return u[:, :rank] * s[:rank], vh[:rank]


def dropped(s: torch.Tensor, rank: int) -> float:
    """||dW - T_rank(dW)||_F^2 = the energy of the singular values past `rank`."""
    return float(s[rank:].pow(2).sum())


def global_update(factors: list[tuple[torch.Tensor, torch.Tensor]], p: list[float]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_stack, A_stack) with B_stack A_stack = sum_k p_k B_k A_k, from each client's (A_k, B_k)."""
    return (torch.cat([pk * b.double() for (_, b), pk in zip(factors, p)], dim=1),
            torch.cat([a.double() for a, _ in factors], dim=0))


# ---------------------------------------------------------------------------------------- client
@dataclass
class FlexLoRAOptions(base.Weighted):  # p_k over the round's clients
    ranks: list[int] = option([], gt=0)  # r_k cycled over the clients in id order (a daemon may cap it with its
    # capability max_lora_rank); empty: every client has the run's adapter.rank
    alpha_per_rank: float = option(0.0, ge=0)  # the scaling s of every rank (alpha_k = s r_k, as FLoRA's option);
    # 0: the run's adapter.alpha / adapter.rank


class FlexLoRARecipe(base.RecipeBase):
    """Client side: a LoRA of the task's rank holding the server's truncation of the global update; train; send."""

    def prepare(self, model: torch.nn.Module, task: Task) -> None:
        t = task.tensors
        run = model.encoder.peft_config["default"]
        s = float(task.config.get("flexlora_scaling", run.lora_alpha / run.r))  # the same scaling at every rank
        given = next(v.shape[0] for k, v in sorted(t.items()) if k.endswith(".lora_A"))
        r = int(task.config.get("flexlora_rank", given))
        name = fresh_lora(model, r, s * r, int(task.config.get("seed", 0)))  # peft init: A random, B = 0
        k = min(r, given)
        with torch.no_grad():
            for m, layer in lora_layers(model).items():
                layer.lora_A[name].weight[:k].copy_(t[m + ".lora_A"][:k])
                layer.lora_B[name].weight[:, :k].copy_(t[m + ".lora_B"][:, :k])
        load_named(model, {n: v for n, v in t.items() if not n.endswith((".lora_A", ".lora_B"))})

    def train(self, model: torch.nn.Module, data: Any, task: Task, privacy: Any = None) -> ClientResult:
        trainer = train_local if privacy is None else privacy.train_local  # DP-SGD on A, B and the head
        metrics = trainer(model, data, train_config(task.config), task.config["seed"])
        return ClientResult("", len(data), factor_state(model), metrics)

    def summand(self, uploads: Tensors, task: Task, weight: float) -> tuple[Tensors, float]:
        """Secure aggregation: each module's dense product B_k A_k instead of its factors (a sum of factors of
        different clients is not a sum of products); the head as it is."""
        out = {k: v for k, v in uploads.items() if not k.endswith((".lora_A", ".lora_B"))}
        for k, a in uploads.items():
            if k.endswith(".lora_A"):
                m = k[: -len(".lora_A")]
                out[m + PRODUCT] = (uploads[m + ".lora_B"].double() @ a.double()).to(a.dtype)
        return out, weight


# ---------------------------------------------------------------------------------------- server
CENTRAL = ("central DP releases a clipped, noised mean of each client's uploaded factors, but FlexLoRA's "
           "aggregate is the mean of the clients' products B_k A_k, which that release does not carry")


class FlexLoRA(base.StrategyBase):
    name = "flexlora"
    Options = FlexLoRAOptions
    Recipe = FlexLoRARecipe
    # Client DP: A and B train by DP-SGD, the SVD is post-processing. Secure aggregation: sum p_k B_k A_k is
    # masked as dense products (m x n per module; summand above), then decomposed.
    privacy = Support(central_dp=CENTRAL)
    _asked: tuple[int, dict[str, int]] = (0, {})  # (round, rank of each client asked in it): set by configure

    def init_state(self, spec: base.ModelSpec) -> GlobalState:
        self.modules = lora_modules(spec.initial)
        self.rank = next(iter(self.modules.values())).rank
        tensors = {k: v.clone() for k, v in head_of(spec.initial).items()}
        for name, t in spec.initial.items():
            if name not in tensors:  # <module>.lora_A.<adapter>.weight -> <module>.lora_A
                tensors[name.rsplit(".", 2)[0]] = t.clone()
        return GlobalState(tensors)

    def configure(self, rnd: int, clients: list[base.ClientInfo], state: GlobalState) -> dict[str, Task]:
        payloads: dict[int, Tensors] = {}  # one per rank, so the engine encodes each once
        tasks = {}
        self._asked = (rnd, {})  # a hint for aggregate_sum (whose uploads are masked); not state
        for c in base.sample_clients(clients, self.settings.clients_per_round, self.settings.seed, rnd):
            r = self._asked[1][c.client_id] = client_rank(c, clients, self.options.ranks or [self.rank])
            if r not in payloads:
                payloads[r] = {k: (v[:r] if k.endswith(".lora_A") else v[:, :r] if k.endswith(".lora_B") else v)
                               for k, v in state.tensors.items()}
            scaling = {"flexlora_scaling": self.options.alpha_per_rank} if self.options.alpha_per_rank else {}
            tasks[c.client_id] = base.train_task(self.settings, rnd, c.client_id, payloads[r], flexlora_rank=r,
                                                 **scaling)
        return tasks

    def _head_contract(self, state: GlobalState) -> Contract:
        return contract_of({k: v for k, v in state.tensors.items() if not k.endswith((".lora_A", ".lora_B"))})

    def upload_contract(self, state: GlobalState) -> Contract:
        return {**self._head_contract(state), **factors_contract(self.modules, self.rank)}

    def task_contract(self, state: GlobalState, task: Task) -> Contract:
        return {**self._head_contract(state), **factors_contract(self.modules, int(task.config["flexlora_rank"]))}

    def sum_contract(self, state: GlobalState) -> Contract:
        products = {m + PRODUCT: TensorSpec((i.out_features, i.in_features), i.dtype) for m, i in self.modules.items()}
        return {**self._head_contract(state), **products}

    def aggregate(self, rnd: int, results: list[ClientResult], state: GlobalState) -> RoundOutcome:
        p = weights([r.num_examples for r in results], self.options.weighting)
        heads = [k for k in state.tensors if not k.endswith((".lora_A", ".lora_B"))]
        tensors = weighted_average([{k: r.tensors[k] for k in heads} for r in results], p) if heads else {}
        ranks = sorted({r.tensors[m + ".lora_A"].shape[0] for r in results for m in self.modules})
        svds = {}
        for m in self.modules:
            b_stack, a_stack = global_update([(r.tensors[m + ".lora_A"], r.tensors[m + ".lora_B"]) for r in results], p)
            svds[m] = product_svd(b_stack, a_stack)
        return RoundOutcome(*self._finish(rnd, state, tensors, svds, ranks))

    def aggregate_sum(self, rnd: int, total: Tensors, weight: float, results: list[ClientResult],
                      state: GlobalState) -> RoundOutcome:
        """Secure aggregation: the SVD of the unmasked mean of the dense products."""
        heads = [k for k in state.tensors if not k.endswith((".lora_A", ".lora_B"))]
        tensors = {k: (total[k] / weight).to(state.tensors[k].dtype) for k in heads}
        asked_rnd, asked = self._asked
        ranks = [asked[r.client_id] for r in results if asked_rnd == rnd and r.client_id in asked] or [self.rank]
        svds = {}
        for m in self.modules:
            u, s, vh = torch.linalg.svd(total[m + PRODUCT].double() / weight, full_matrices=False)
            q = min(len(s), sum(ranks))  # the exact rank bound sum_k r_k
            svds[m] = (u[:, :q], s[:q], vh[:q])
        return RoundOutcome(*self._finish(rnd, state, tensors, svds, sorted(set(ranks))))

    def _finish(self, rnd: int, state: GlobalState, tensors: Tensors,
                svds: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], ranks: list[int]
                ) -> tuple[GlobalState, dict[str, float]]:
        total2 = lost2 = 0.0
        q = 0
        for m, (u, s, vh) in svds.items():
            i = self.modules[m]
            q = len(s)
            b, a = redistribute(u, s, vh, q)
            # row-major like every decoded copy (LAPACK returns column-major): the same BLAS path in the forward pass
            tensors[m + ".lora_B"], tensors[m + ".lora_A"] = b.to(i.dtype).contiguous(), a.to(i.dtype).contiguous()
            total2 += float(s.pow(2).sum())
            lost2 += dropped(s, min(ranks))
        metrics = {
            "global_rank": float(q),
            "update_norm": math.sqrt(total2),  # ||dW||_F over all modules (factor units)
            "truncation_error_rel": math.sqrt(lost2 / total2) if total2 > 0 else 0.0,  # what the smallest rank of
            # the round drops of dW when it continues from its truncation
        }
        return GlobalState(tensors, {}, rnd), metrics

    def export(self, tensors: Tensors, model: torch.nn.Module) -> base.Exported:
        """A plain LoRA of the global rank R = A.shape[0] at the run's scaling (its first r components are the best
        rank-r approximation); the head as is."""
        return exported_factors(tensors, model, self.options.alpha_per_rank)
