"""Ferret (ALGORITHMS.md §6.1): first-order local training, updates projected on shared random bases.

The tuned parameters (every trainable one, or those matching `strategy.params`), in sorted name order,
are grouped greedily into L blocks (`partition`). A client trains as FedAvg's clients do, then, per
block l with descent displacement delta_l = old - new, picks n_l of the K pool seeds

    n_l = clamp(floor(||delta_l|| / max_l' ||delta_l'|| * K), min_bases, K)      (K for the largest block)

uniformly without replacement and uploads the sparse coordinates

    gamma_{j,l} = (d_l / n_l) <delta_l, v_{j,l}>        v_{j,l} regenerated from (pool seed j, block l)

as (index l*K + j, value) pairs. The server sums them into a table Gamma (weights p_k) and steps

    theta_l <- theta_l - server_lr * sum_j clip(Gamma_{j,l} v_{j,l})     (clip: per (seed, block) norm)

Clients apply the same tables (`apply_table`, the same code) instead of downloading weights; a client
that missed rounds gets the tables it missed, or the dense model when that is fewer bytes. Each task
carries the hash of theta^t, which the client checks before training.

Under secure aggregation a client uploads its coordinates as a dense table (zero where it chose no
seed, weighted by p_k), masked; the server learns only the summed table Gamma, which is all it steps
with, so the result is the plain one up to fixed-point rounding.

Bases: "gaussian" (default) draws v ~ N(0, I/d_l), so E[v v^T] = I/d_l and the estimator is unbiased;
"truncnormal" is the reference's N(0, 1) truncated to +-1/sqrt(d_l), whose E[delta_hat] is about
delta/3 (the reference's server lr of 10 absorbs it).
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Any

import torch

from fedadapt.core.codec import Contract, TensorSpec
from fedadapt.core.config import option
from fedadapt.core.errors import ConfigError, PayloadError
from fedadapt.core.rng import derive_seed, normal, permutation, uniform
from fedadapt.models.adapters import adapter_state, load_adapter_state
from fedadapt.privacy.compat import Support
from fedadapt.training.loop import train_config, train_local

from .aggregate import weights
from .base import (
    ClientInfo,
    ClientResult,
    GlobalState,
    ModelSpec,
    PerModel,
    RecipeBase,
    RoundOutcome,
    StrategyBase,
    Task,
    Tensors,
    Weighted,
    sample_clients,
    train_task,
)
from .lowrank import content_hash, hash_metric, known, nbytes, prune_history, remember, remember_silent
from .seeded import det_norm, flat64, pool_seeds, selected, unflat

ENTRIES = "ferret.entries"  # upload: int32 (N, 2): column 0 the index l*K + j, column 1 the fp32 bits of gamma
TABLE = "ferret.table"  # secure aggregation: the entries as a dense fp64 table of L*K values, summed masked
_TABLE = re.compile(r"^ferret/round/(?P<round>\d+)/(?P<part>index|value)$")  # a round's table (aux, download)
PRUNED = "ferret/pruned"  # tables of rounds <= this were dropped: clients older than it get the dense model
BASES = ("gaussian", "truncnormal")


# ---------------------------------------------------------------------------------------- pure maths
def partition(sizes: list[int], ratio: float = 0.9) -> list[list[int]]:
    """Greedy blocks of consecutive tensors (by position): a new block starts when adding the next
    tensor would exceed ratio * median(sizes) (the reference's rule; a large tensor is a block alone)."""
    cap = ratio * statistics.median(sizes)
    blocks: list[list[int]] = [[]]
    total = 0
    for i, s in enumerate(sizes):
        if blocks[-1] and total + s > cap:
            blocks.append([])
            total = 0
        blocks[-1].append(i)
        total += s
    return blocks


def base(seed: int, block: int, d: int, kind: str = "gaussian") -> torch.Tensor:
    """v_{j,l} (fp32, length d) from pool seed j's value and the block index, drawn by core.rng."""
    s = derive_seed(seed, "block", block)
    if kind == "gaussian":
        return normal(s, (d,)) / math.sqrt(d)
    # N(0, 1) truncated to [-b, b], b = 1/sqrt(d), by inverting the CDF of a seeded uniform
    b = 1.0 / math.sqrt(d)
    lo, hi = torch.special.ndtr(torch.tensor([-b, b], dtype=torch.float64))
    return torch.special.ndtri(lo + (hi - lo) * uniform(s, (d,)).double()).float()


def seed_counts(norms: list[float], k: int, min_bases: int) -> list[int]:
    """n_l: bases per block, proportional to the block's update norm; K for the largest block."""
    top = max(norms)
    if top == 0 or not all(map(math.isfinite, norms)):  # no update; or a diverged one (its NaNs get it rejected)
        return [min(min_bases, k)] * len(norms)
    return [min(k, max(math.floor(n / top * k), min_bases)) for n in norms]


def coordinates(delta: torch.Tensor, seeds: list[int], block: int, chosen: list[int], kind: str) -> torch.Tensor:
    """gamma_{j,l} = (d_l / n_l) <delta_l, v_{j,l}> for the chosen seed indices j (fp64)."""
    d, d64 = delta.numel(), delta.double()
    return torch.tensor([d / len(chosen) * float(torch.dot(d64, base(seeds[j], block, d, kind).double()))
                         for j in chosen], dtype=torch.float64)


def apply_table(flat: list[torch.Tensor], index: torch.Tensor, value: torch.Tensor, seeds: list[int],
                kind: str, lr: float, clip: float) -> list[torch.Tensor]:
    """Blocks (fp64 vectors) minus lr * sum_j clip(Gamma_{j,l} v_{j,l}); entries in index order.

    Elementwise fp64 ops and a deterministic norm only, so the server and every client get equal bits.
    """
    k = len(seeds)
    out = [b.clone() for b in flat]
    for i, gamma in zip(index.tolist(), value.double().tolist()):
        l, j = divmod(i, k)
        v = base(seeds[j], l, out[l].numel(), kind).double()
        c = gamma
        if clip > 0 and gamma != 0:
            norm = abs(gamma) * det_norm(v)
            c = gamma * (clip / norm) if norm > clip else gamma
        out[l].add_(v, alpha=-lr * c)
    return out


def reconstruct(index: torch.Tensor, value: torch.Tensor, sizes: list[int], seeds: list[int], kind: str
                ) -> torch.Tensor:
    """delta_hat = sum_j Gamma_{j,l} v_{j,l} per block, concatenated (no clip, lr 1): linear in Gamma."""
    zeros = [torch.zeros(d, dtype=torch.float64) for d in sizes]
    return -torch.cat(apply_table(zeros, index, value, seeds, kind, 1.0, 0.0))


def pack(index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """(index, fp32 value) pairs as one int32 (N, 2) tensor: one length, validated as a whole."""
    return torch.stack([index.to(torch.int32), value.to(torch.float32).view(torch.int32)], dim=1)


def unpack(entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return entries[:, 0].long(), entries[:, 1].contiguous().view(torch.float32)


def entries_error(k: int, blocks: int, min_bases: int):
    """The upload check: indices in range, strictly increasing, >= min_bases per block, finite values."""
    def check(t: torch.Tensor) -> str | None:
        index, value = unpack(t)
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= k * blocks):
            return f"has indices outside [0, {k * blocks})"
        if len(index) > 1 and not bool((index[1:] > index[:-1]).all()):
            return "has indices that are not strictly increasing"
        if int(torch.bincount(index // k, minlength=blocks).min()) < min(min_bases, k):
            return f"has a block with fewer than {min(min_bases, k)} bases"
        if not bool(torch.isfinite(value).all()):
            return "contains NaN or Inf"
        return None
    return check


class Layout:
    """Which tensors are tuned, their blocks, and the pool seeds: built identically by every party."""

    def __init__(self, shapes: dict[str, torch.Size], patterns: list[str], pool: int, k: int):
        self.names = selected(shapes, patterns)
        sizes = [math.prod(shapes[n]) for n in self.names]
        self.blocks = [[self.names[i] for i in b] for b in partition(sizes)]
        self.sizes = [sum(math.prod(shapes[n]) for n in b) for b in self.blocks]
        self.seeds = pool_seeds(pool, k)

    def flat(self, tensors: Tensors) -> list[torch.Tensor]:
        return [flat64(tensors, b) for b in self.blocks]

    def apply(self, tensors: Tensors, index, value, kind: str, lr: float, clip: float) -> Tensors:
        new = apply_table(self.flat(tensors), index, value, self.seeds, kind, lr, clip)
        out: Tensors = {}
        for b, vec in zip(self.blocks, new):
            out |= unflat(vec, tensors, b)
        return out


def tables(tensors: Tensors) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """round -> (index, value) of the tables in a payload or in aux."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if g := _TABLE.match(name):
            out.setdefault(int(g["round"]), {})[g["part"]] = t
    return {r: (p["index"].long(), p["value"]) for r, p in sorted(out.items())}


# ---------------------------------------------------------------------------------------- client
class _Cache:
    """A client model's copy of the global tuned tensors and the round they belong to (0: theta_0)."""

    def __init__(self, model: torch.nn.Module):
        self.start = adapter_state(model)  # captured before any task changed the model
        self.theta: Tensors | None = None
        self.version = 0


def _layout(cfg: dict[str, Any], shapes: dict[str, torch.Size]) -> Layout:
    return Layout(shapes, list(cfg.get("ferret_params", [])), int(cfg["ferret_pool"]), int(cfg["ferret_seeds"]))


class FerretRecipe(RecipeBase):
    def __init__(self) -> None:
        self._caches = PerModel(_Cache)

    def prepare(self, model: torch.nn.Module, task: Task) -> None:
        cache = self._caches(model)
        if "ferret_pool" not in task.config:  # an evaluation task carries the dense global model
            load_adapter_state(model, task.tensors)
            return
        cfg, t = task.config, task.tensors
        layout = self.layout = _layout(cfg, {n: v.shape for n, v in cache.start.items()})
        if cache.theta is None:
            cache.theta = {n: cache.start[n] for n in layout.names}
        target = int(cfg["ferret_base_round"])
        dense = {n: t[n] for n in layout.names if n in t}
        if dense:
            if len(dense) != len(layout.names):
                raise PayloadError("task has the dense values of only some tuned tensors")
            cache.theta, cache.version = {n: v.clone() for n, v in dense.items()}, target
        elif cache.version < int(cfg.get("ferret_from", cache.version)):
            raise PayloadError(f"this client's model is at round {cache.version}, but the task's tables start "
                               f"after round {cfg['ferret_from']}")
        for rnd, (index, value) in tables(t).items():
            if rnd > cache.version:
                cache.theta = layout.apply(cache.theta, index, value, cfg["ferret_basis"],
                                           float(cfg["ferret_server_lr"]), float(cfg["ferret_clip"]))
                cache.version = rnd
        if cache.version != target:
            raise PayloadError(f"this client's model is at round {cache.version}, the task needs round {target}")
        digest = content_hash(cache.theta)
        if "ferret_hash" in cfg and digest != cfg["ferret_hash"]:
            raise PayloadError(f"model out of step with the coordinator at round {target}")
        load_adapter_state(model, {**cache.start, **cache.theta})
        self.model_hash = hash_metric(digest)

    def train(self, model: torch.nn.Module, data: Any, task: Task, privacy: Any = None) -> ClientResult:
        cfg, layout = task.config, self.layout
        params = dict(model.named_parameters())
        old = {n: params[n].detach().clone() for n in layout.names}
        frozen = [p for n, p in params.items() if p.requires_grad and n not in old]
        for p in frozen:  # only the tuned tensors train
            p.requires_grad_(False)
        try:
            trainer = train_local if privacy is None else privacy.train_local  # DP-SGD (fedadapt.privacy)
            metrics = trainer(model, data, train_config(cfg), cfg["seed"])
        finally:
            for p in frozen:
                p.requires_grad_(True)
        deltas = [o - n for o, n in zip(layout.flat(old), layout.flat({n: params[n] for n in layout.names}))]
        k = len(layout.seeds)
        counts = seed_counts([float(d.norm()) for d in deltas], k, int(cfg["ferret_min_bases"]))
        index, value = [], []
        for l, (d, n) in enumerate(zip(deltas, counts)):
            chosen = sorted(permutation(derive_seed(cfg["seed"], "ferret-bases", l), k)[:n].tolist())
            index += [l * k + j for j in chosen]
            value.append(coordinates(d, layout.seeds, l, chosen, cfg["ferret_basis"]))
        entries = pack(torch.tensor(index), torch.cat(value))
        metrics |= {"model_hash": self.model_hash, "bases": float(len(index))}
        return ClientResult("", len(data), {ENTRIES: entries}, metrics)

    def summand(self, uploads: Tensors, task: Task, weight: float) -> tuple[Tensors, float]:
        """Secure aggregation: the entries as a dense table (weight x gamma at l*K + j, 0 elsewhere)."""
        index, value = unpack(uploads[ENTRIES])
        table = torch.zeros(len(self.layout.blocks) * int(task.config["ferret_seeds"]), dtype=torch.float64)
        table[index] = value.double() * weight
        return {TABLE: table}, 1.0


# ---------------------------------------------------------------------------------------- server
@dataclass
class FerretOptions(Weighted):  # p_k ("uniform": the reference's --equal_weight)
    seeds: int = option(200, ge=1)  # K, the fixed candidate seeds (ferret.sh: 200)
    basis: str = option("gaussian", choices=BASES)  # "gaussian" (unbiased, E[v v^T] = I/d) or "truncnormal"
    # (the reference's)
    server_lr: float = option(1.0, ge=0)  # eta_s (the reference: 10, with its truncnormal basis)
    clip: float = option(10.0, ge=0)  # per (seed, block) norm clip of Gamma_{j,l} v_{j,l}; 0: none
    min_bases: int = option(2, ge=1)  # the least n_l of any block
    params: list[str] = option([])  # globs of the tuned parameters; empty: every trainable one


class Ferret(StrategyBase):
    name = "ferret"
    Options = FerretOptions
    Recipe = FerretRecipe
    privacy = Support(central_dp="Ferret's uploads are coordinates on random bases, not updates the server could "
                                 "clip: use privacy.dp = 'client'")  # its projection post-processes DP-SGD
    _asked: tuple[int, set[str]] = (0, set())  # (round, clients asked in it): set by configure

    def init_state(self, spec: ModelSpec) -> GlobalState:
        o = self.options
        self.pool = derive_seed(self.settings.seed, "ferret-pool")
        self.layout = Layout({n: v.shape for n, v in spec.initial.items()}, o.params, self.pool, o.seeds)
        if o.seeds * len(self.layout.blocks) >= 2**31:
            raise ConfigError("strategy.seeds x blocks must stay below 2^31 (int32 indices)")
        return GlobalState({k: v.clone() for k, v in spec.initial.items()},
                           {PRUNED: torch.tensor(0, dtype=torch.int64)})

    def _catch_up(self, state: GlobalState, version: int) -> Tensors:
        """What a client at `version` needs: the tables since, or the dense tuned tensors if fewer bytes."""
        if version == state.round:
            return {}
        dense = {n: state.tensors[n] for n in self.layout.names}
        if version >= int(state.aux[PRUNED]):
            missed = {k: v for k, v in state.aux.items() if (g := _TABLE.match(k)) and int(g["round"]) > version}
            if nbytes(missed) < nbytes(dense):
                return missed
        return dense

    def configure(self, rnd: int, clients: list[ClientInfo], state: GlobalState) -> dict[str, Task]:
        o = self.options
        chosen = sample_clients(clients, self.settings.clients_per_round, self.settings.seed, rnd)
        self._asked = (rnd, {c.client_id for c in chosen})  # a hint for aggregate; not state
        digest = content_hash({n: state.tensors[n] for n in self.layout.names})
        payloads: dict[int, Tensors] = {}  # one dict per client version: the engine encodes each once
        tasks = {}
        for c in chosen:
            version = known(state.aux, c.client_id, "ferret", 0)  # a fresh client holds theta_0; -1: unknown
            if version not in payloads:
                payloads[version] = self._catch_up(state, version)
            tasks[c.client_id] = train_task(
                self.settings, rnd, c.client_id, payloads[version], ferret_pool=self.pool, ferret_seeds=o.seeds,
                ferret_params=list(o.params), ferret_basis=o.basis, ferret_server_lr=o.server_lr,
                ferret_clip=o.clip, ferret_min_bases=o.min_bases, ferret_base_round=state.round,
                ferret_from=version, ferret_hash=digest)
        return tasks

    def upload_contract(self, state: GlobalState) -> Contract:
        k, nb, m = self.options.seeds, len(self.layout.blocks), min(self.options.min_bases, self.options.seeds)
        return {ENTRIES: TensorSpec((range(nb * m, nb * k + 1), 2), torch.int32, entries_error(k, nb, m))}

    def sum_contract(self, state: GlobalState) -> Contract:
        return {TABLE: TensorSpec((len(self.layout.blocks) * self.options.seeds,), torch.float64)}

    def aggregate(self, rnd: int, results: list[ClientResult], state: GlobalState) -> RoundOutcome:
        p = weights([r.num_examples for r in results], self.options.weighting)
        table = torch.zeros(len(self.layout.blocks) * self.options.seeds, dtype=torch.float64)
        for r, pk in zip(results, p):
            index, value = unpack(r.tensors[ENTRIES])
            table.index_add_(0, index, value.double() * pk)
        return self._step(rnd, table, results, state)

    def aggregate_sum(self, rnd: int, total: Tensors, weight: float, results: list[ClientResult],
                      state: GlobalState) -> RoundOutcome:
        """Secure aggregation: Gamma is the unmasked sum of the clients' weighted tables over their weight."""
        return self._step(rnd, total[TABLE] / weight, results, state)

    def _step(self, rnd: int, table: torch.Tensor, results: list[ClientResult], state: GlobalState) -> RoundOutcome:
        """theta^{t+1} from the round's table Gamma (fp64), which is kept (fp32, nonzero entries) for clients."""
        o, layout = self.options, self.layout
        value32 = table.float()
        index = torch.nonzero(value32).flatten()
        value32 = value32[index]  # what travels, and so what the server applies too
        tensors = {**state.tensors, **layout.apply(state.tensors, index, value32, o.basis, o.server_lr, o.clip)}
        aux = dict(state.aux)
        aux[f"ferret/round/{rnd}/index"], aux[f"ferret/round/{rnd}/value"] = index.to(torch.int32), value32
        remember(aux, [r.client_id for r in results], "ferret", state.round)
        remember_silent(aux, self._asked, rnd, results, "ferret", -1)  # it may hold anything: dense next time
        prune_history(aux, _TABLE, PRUNED, nbytes({n: tensors[n] for n in layout.names}))
        hashes = {r.metrics["model_hash"] for r in results if "model_hash" in r.metrics}
        metrics = {
            "table_entries": float(len(index)),
            "bases_uploaded": sum(r.metrics.get("bases", 0.0) for r in results),
            "model_hashes_distinct": float(len(hashes)),
            "model_hash": hashes.pop() if len(hashes) == 1 else -1.0,
        }
        return RoundOutcome(GlobalState(tensors, aux, rnd), metrics)
