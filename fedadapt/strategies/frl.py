"""FRL: federated rank learning by voting (ALGORITHMS.md §5), on supermask layers (models/supermask.py).

What travels, both ways, is one ranking per layer: the layer's edge ids from least to most important,
in the smallest integer dtype that holds the layer size. A client sets its scores from the global
ranking (s[R[j]] = sigma[j]), trains them, and uploads argsort(scores). The server votes:

    pos_u(e) = index of edge e in client u's ranking        (0 = least important)
    V(e)     = sum_u pos_u(e)                               reputation, one vote per client
    R_g      = argsort(V), stable: ties by edge id          the new global ranking

Every client moves an edge's reputation by at most n - 1, whatever it sends; the mask keeps the top
`keep` of R_g (signed-score convention, see models/supermask.py). Uploads that are not permutations
are rejected by the payload contract before they reach `aggregate`.

Under secure aggregation a client uploads its positions pos_u (masked) and the server learns only V.
It can then no longer check that each upload is a permutation, so the n - 1 bound on one client's
influence rests on the clients being honest about the format: secure aggregation protects the clients'
rankings from the server, and gives up FRL's protection of the vote from a malicious client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedadapt.core.codec import Contract, TensorSpec
from fedadapt.core.config import Section
from fedadapt.core.errors import ConfigError, ModelError
from fedadapt.models.supermask import ranking, supermasks
from fedadapt.privacy.compat import Support
from fedadapt.training.loop import train_config, train_local

from .base import ClientResult, GlobalState, ModelSpec, RecipeBase, RoundOutcome, StrategyBase, Task, Tensors


def compact_dtype(n: int) -> torch.dtype:
    """Smallest integer dtype the codec carries that holds edge ids 0..n-1."""
    for dtype, top in ((torch.uint8, 2**8), (torch.int16, 2**15), (torch.int32, 2**31)):
        if n <= top:
            return dtype
    return torch.int64


def encode_ranking(values: torch.Tensor) -> torch.Tensor:
    """The ranking of `values` (scores or reputations), compactly typed."""
    return ranking(values).to(compact_dtype(values.numel()))


def permutation_error(t: torch.Tensor) -> str | None:
    """Why `t` is not a permutation of 0..n-1, or None if it is."""
    n = t.numel()
    if n == 0:
        return None
    v = t.reshape(-1).long()
    lo, hi = int(v.min()), int(v.max())
    if lo < 0 or hi >= n:
        return f"is not a permutation of 0..{n - 1}: holds {lo if lo < 0 else hi}"
    counts = torch.bincount(v, minlength=n)
    if int(counts.max()) > 1:
        return f"is not a permutation of 0..{n - 1}: edge {int(counts.argmax())} appears {int(counts.max())} times"
    return None


def positions(rank: torch.Tensor) -> torch.Tensor:
    """pos[e] = index of edge e in the ranking (int64): the inverse permutation."""
    r = rank.long()
    pos = torch.empty_like(r)
    pos[r] = torch.arange(r.numel(), device=r.device)
    return pos


def reputation(rankings: list[torch.Tensor]) -> torch.Tensor:
    """V(e) = sum over clients of e's rank position (int64; total = clients * n(n-1)/2)."""
    return torch.stack([positions(r) for r in rankings]).sum(dim=0)


def vote(rankings: list[torch.Tensor]) -> torch.Tensor:
    """The new global ranking: edges by ascending reputation, ties by edge id; in the input dtype."""
    return ranking(reputation(rankings)).to(rankings[0].dtype)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two rankings of the same edges (1: identical order)."""
    n = a.numel()
    if n < 2:
        return 1.0
    d = (positions(a) - positions(b)).double()
    return 1.0 - 6.0 * float((d * d).sum()) / (n * (n * n - 1.0))


@dataclass
class FRLOptions(Section):
    """FRL has no server options: one vote per client is the method. The mask's keep fraction is a
    property of the model (`adapter.keep`), since clients and the evaluator apply it."""


class FRLRecipe(RecipeBase):
    """Client side: scores from the global ranking, train them, send back their ranking."""

    def prepare(self, model: torch.nn.Module, task: Task) -> None:
        masks = supermasks(model)
        if masks.keys() != task.tensors.keys():
            missing, extra = sorted(masks.keys() - task.tensors.keys()), sorted(task.tensors.keys() - masks.keys())
            raise ModelError(f"rankings do not fit the model's supermasks: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        for name, rank in task.tensors.items():
            masks[name].set_ranking(rank)

    def train(self, model: torch.nn.Module, data: Any, task: Task, privacy: Any = None) -> ClientResult:
        trainer = train_local if privacy is None else privacy.train_local  # DP-SGD on the scores (fedadapt.privacy)
        metrics = trainer(model, data, train_config(task.config), task.config["seed"])
        uploads = {name: encode_ranking(m.scores.detach()) for name, m in supermasks(model).items()}
        return ClientResult("", len(data), uploads, metrics)

    def summand(self, uploads: Tensors, task: Task, weight: float) -> tuple[Tensors, float]:
        """Secure aggregation: the rank positions, whose sum over clients is the reputation (one vote each)."""
        return {k: positions(r) for k, r in uploads.items()}, 1.0


class FRL(StrategyBase):
    name = "frl"
    Options = FRLOptions
    Recipe = FRLRecipe
    privacy = Support(central_dp="FRL's vote is a sum of rank positions, not of updates the server could clip: use "
                                 "privacy.dp = 'client'")  # DP-SGD on the scores; positions sum to the reputation
    unsupported_tasks = {"causal-lm": "FRL votes on rankings of supermask scores (an MLP's, or a classifier's masked "
                                      "LoRA factors and head), which a causal LM fine-tuned with LoRA does not "
                                      "have"}

    def init_state(self, spec: ModelSpec) -> GlobalState:
        not_scores = [k for k in spec.initial if not k.endswith(".scores")]
        if not_scores:
            raise ConfigError(f"strategy 'frl' ranks supermask scores, but {not_scores[0]!r} trains too; "
                              "set adapter.kind = \"supermask\"")
        # the initial ranking is that of the seeded initial scores: the global model starts as every client
        return GlobalState({k: encode_ranking(v) for k, v in spec.initial.items()})

    def upload_contract(self, state: GlobalState) -> Contract:
        return {k: TensorSpec(tuple(r.shape), r.dtype, permutation_error) for k, r in state.tensors.items()}

    def aggregate(self, rnd: int, results: list[ClientResult], state: GlobalState) -> RoundOutcome:
        return self._vote(rnd, {k: reputation([r.tensors[k] for r in results]) for k in state.tensors}, state)

    def sum_contract(self, state: GlobalState) -> Contract:
        return {k: TensorSpec(tuple(r.shape), torch.int64) for k, r in state.tensors.items()}

    def aggregate_sum(self, rnd: int, total: Tensors, weight: float, results: list[ClientResult],
                      state: GlobalState) -> RoundOutcome:
        """Secure aggregation: `total` is the reputation itself (a sum of integers, exact in fixed point)."""
        return self._vote(rnd, {k: total[k].round().long() for k in state.tensors}, state)

    def _vote(self, rnd: int, reputations: Tensors, state: GlobalState) -> RoundOutcome:
        """The new global ranking: edges by ascending reputation, ties by edge id, in the ranking dtype."""
        new = {k: ranking(v).to(state.tensors[k].dtype) for k, v in reputations.items()}
        stability = sum(spearman(new[k], state.tensors[k]) for k in new) / max(len(new), 1)
        return RoundOutcome(GlobalState(new, {}, rnd), {"rank_stability": stability})
