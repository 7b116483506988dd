"""Shared-seed zeroth-order fine-tuning: FedKSeed / FedKSeed-Pro on MeZO steps (ALGORITHMS.md §6.2-6.3).

A run fixes a pool of K seeds. A client takes `steps` two-point SPSA steps; step i draws a seed s_i
from the pool (uniformly, or with the Pro probabilities P), perturbs the parameters by +-eps z_{s_i},
and moves them by -lr g_i z_{s_i} with g_i = (L+ - L-) / (2 eps). It uploads only the (s_i, g_i) pairs.
Without weight decay every update is linear in z, so the server keeps K scalars

    G_s += lr_t * sum_k p_k * (sum of client k's g_i with s_i = s)       (never reset)

and the model is always theta = theta_0 - sum_s G_s z_s: the downlink is G itself (K numbers), from
which any client, however late, rebuilds theta bit for bit (`rebuild`, the same code on both sides;
each task carries the hash of theta^t, checked by the client before it trains).

Under secure aggregation a client uploads, per seed, the p_k-weighted sum of its g's (and for Pro its
sum of min(|g|, 1000) and count), masked: K numbers each; the server learns only their sums, which are
all that G and the Pro statistics need.

Only the parameters matching `strategy.params` (default: every trainable one) are tuned; weight decay
is not supported (it would break the K-scalar collapse, §6.6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fedadapt.core.codec import Contract, TensorSpec
from fedadapt.core.config import option
from fedadapt.core.errors import ConfigError, PayloadError
from fedadapt.core.rng import derive_seed, generator, normal
from fedadapt.models.adapters import adapter_state, load_adapter_state
from fedadapt.models.device import device_of, on_device
from fedadapt.training.loop import batches

from . import base
from .aggregate import weights
from .base import ClientResult, GlobalState, RoundOutcome, Task, Tensors
from .lowrank import content_hash, hash_metric
from .seeded import fill_normal, flat64, pool_seeds, selected, unflat

SEEDS, GRADS = "zo.seeds", "zo.grads"  # upload: the seed index and the projected gradient of each step
ACC, PROBS = "zo.G", "zo.P"  # download: the accumulated scalars (fp64) and, for Pro, the seed probabilities
THETA0 = "zo/theta0/"  # aux: theta_0 of the tuned parameters (immutable)
ABS_SUM, COUNT = "zo/abs_sum", "zo/count"  # aux (Pro): per seed, sum of min(|g|, 1000) and number of g's
PRO_CLIP = 1000.0
BY_SEED = ("zo.g_by_seed", "zo.abs_by_seed", "zo.count_by_seed")  # secure aggregation: the dense per-seed sums


# ---------------------------------------------------------------------------------------- pure maths
def rebuild(theta0: Tensors, names: list[str], acc: torch.Tensor, seeds: list[int]) -> Tensors:
    """theta_0 - sum_s acc_s z_s over the seeds with acc_s != 0, in index order, in fp64; one rounding."""
    theta = flat64(theta0, names)
    z = torch.empty(theta.numel())  # fp32, widened exactly to fp64 by the in-place add
    for s in torch.nonzero(acc).flatten().tolist():
        theta.add_(fill_normal(seeds[s], z), alpha=-float(acc[s]))
    return unflat(theta, theta0, names)


def apply_steps(theta: Tensors, names: list[str], idx: list[int], scalars: list[float], seeds: list[int]) -> Tensors:
    """theta - c_i z_{s_i} for each step in turn (what a client does locally): replay's reference."""
    out = {n: theta[n].clone() for n in names}
    for s, c in zip(idx, scalars):
        z = unflat(normal(seeds[s], (sum(out[n].numel() for n in names),)), out, names)
        for n in names:
            out[n].add_(z[n], alpha=-c)
    return out


def accumulate(acc: torch.Tensor, uploads: list[tuple[torch.Tensor, torch.Tensor]], p: list[float],
               lr: float) -> torch.Tensor:
    """acc + lr * sum_k p_k g^(k), each client's (seed index, g) pairs added in upload order (fp64)."""
    acc = acc.clone()
    for (idx, g), pk in zip(uploads, p):
        acc.index_add_(0, idx.long(), g.double() * (pk * lr))
    return acc


def pro_probabilities(abs_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """FedKSeed-Pro: P = softmax(minmax(a)), a_s the mean |g| of seed s over a history that starts at 0.

    Equal histories (and so the start) give the uniform P: the min-max of a constant vector is 0.
    """
    a = abs_sum.double() / (count.double() + 1.0)
    span = a.max() - a.min()
    return torch.softmax((a - a.min()) / span if span > 0 else torch.zeros_like(a), dim=0)


def pro_update(abs_sum: torch.Tensor, count: torch.Tensor, uploads: list[tuple[torch.Tensor, torch.Tensor]]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    abs_sum, count = abs_sum.to(torch.float64, copy=True), count.to(torch.float64, copy=True)
    for idx, g in uploads:
        abs_sum.index_add_(0, idx.long(), g.double().abs().clamp(max=PRO_CLIP))
        count.index_add_(0, idx.long(), torch.ones(len(idx), dtype=torch.float64))
    return abs_sum, count


# ---------------------------------------------------------------------------------------- client
def spsa_step(params: list[torch.Tensor], z: list[torch.Tensor], eps: float, loss_fn, restore: str
              ) -> tuple[float, float]:
    """(L+, L-) at theta +- eps z; theta is left exactly as it was (copied back, or +eps -2eps +eps)."""
    saved = [p.clone() for p in params] if restore == "copy" else None
    torch._foreach_add_(params, z, alpha=eps)
    plus = loss_fn()
    if saved is not None:
        torch._foreach_copy_(params, saved)
        torch._foreach_add_(params, z, alpha=-eps)
    else:
        torch._foreach_add_(params, z, alpha=-2 * eps)
    minus = loss_fn()
    if saved is not None:
        torch._foreach_copy_(params, saved)
    else:
        torch._foreach_add_(params, z, alpha=eps)
    return plus, minus


class _Cache:
    """What a client model holds: theta_0 (captured before anything changed it) and theta for one G."""

    def __init__(self, model: torch.nn.Module):
        self.theta0 = adapter_state(model)
        self.acc: torch.Tensor | None = None
        self.theta: Tensors = {}


class ZORecipe(base.RecipeBase):
    """Client side: rebuild theta^t from theta_0 and G (cached while G is unchanged), run SPSA steps."""

    def __init__(self) -> None:
        self._caches = base.PerModel(_Cache)

    def prepare(self, model: torch.nn.Module, task: Task) -> None:
        cache = self._caches(model)
        if ACC not in task.tensors:  # an evaluation task carries the dense global model
            load_adapter_state(model, task.tensors)
            return
        cfg, acc = task.config, task.tensors[ACC]
        names = selected(cache.theta0, list(cfg.get("zo_params", [])))
        if cache.acc is None or not torch.equal(cache.acc, acc):
            cache.theta = rebuild(cache.theta0, names, acc, pool_seeds(int(cfg["zo_pool"]), len(acc)))
            cache.acc = acc.clone()
        digest = content_hash(cache.theta)
        if "zo_hash" in cfg and digest != cfg["zo_hash"]:
            raise PayloadError(f"model rebuilt from theta_0 and the seed scalars is out of step with the "
                               f"coordinator at round {task.round - 1}")
        load_adapter_state(model, {**cache.theta0, **cache.theta})
        self.model_hash = hash_metric(digest)

    def train(self, model: torch.nn.Module, data: Any, task: Task, privacy: Any = None) -> ClientResult:
        if privacy is not None:  # refused at config time too (privacy_support); a daemon must not train it
            raise ConfigError("strategy zo does not support client differential privacy")
        cfg = task.config
        k = len(task.tensors[ACC])
        seeds = pool_seeds(int(cfg["zo_pool"]), k)
        params = dict(model.named_parameters())
        names = selected([n for n, p in params.items() if p.requires_grad], list(cfg.get("zo_params", [])))
        plist = [params[n] for n in names]
        steps, eps, lr = int(cfg["zo_steps"]), float(cfg["zo_eps"]), float(cfg["lr"])
        clip, restore = float(cfg.get("zo_clip", 0.0)), str(cfg.get("zo_restore", "copy"))
        g = generator(derive_seed(cfg["seed"], "zo-seeds"))
        if PROBS in task.tensors:
            choice = torch.multinomial(task.tensors[PROBS].double(), steps, replacement=True, generator=g)
        else:
            choice = torch.randint(k, (steps,), generator=g)
        grads = torch.zeros(steps, dtype=torch.float32)
        flat = torch.empty(sum(p.numel() for p in plist))  # drawn on the CPU (core/rng.py), moved per step
        device = device_of(model)
        total, skipped = 0.0, 0
        model.eval()  # no dropout: both evaluations of a step must see the same function
        with torch.no_grad():
            for i, idx in enumerate(batches(len(data), min(int(cfg.get("batch_size", 32)), len(data)), steps,
                                            cfg["seed"])):
                inputs, labels = on_device(data.batch(idx), device)
                fill_normal(seeds[int(choice[i])], flat)
                z = [v.view_as(p).to(p.device, p.dtype) for v, p in zip(flat.split([p.numel() for p in plist]), plist)]
                plus, minus = spsa_step(plist, z, eps, lambda: float(data.loss(model(**inputs), labels)),
                                        restore)
                total += (plus + minus) / 2
                if not (math.isfinite(plus) and math.isfinite(minus)) or (clip > 0 and abs(plus - minus) > clip):
                    skipped += 1  # FedKSeed's skip of a step whose loss difference is too large: g = 0
                    continue
                grads[i] = (plus - minus) / (2 * eps)  # rounded to fp32 here: what the server will apply
                torch._foreach_add_(plist, z, alpha=-lr * float(grads[i]))
        metrics = {"loss": total / steps, "steps": float(steps), "skipped_steps": float(skipped),
                   "model_hash": self.model_hash}
        return ClientResult("", len(data), {SEEDS: choice.to(torch.int32), GRADS: grads}, metrics)

    def summand(self, uploads: Tensors, task: Task, weight: float) -> tuple[Tensors, float]:
        """Secure aggregation: per seed, weight x the sum of this client's g's (and, for Pro, the unweighted
        statistics), dense over the K seeds."""
        k = len(task.tensors[ACC])
        idx, g = uploads[SEEDS].long(), uploads[GRADS].double()
        out = {BY_SEED[0]: torch.zeros(k, dtype=torch.float64).index_add_(0, idx, g * weight)}
        if PROBS in task.tensors:
            out[BY_SEED[1]], out[BY_SEED[2]] = pro_update(torch.zeros(k), torch.zeros(k), [(idx, g)])
        return out, 1.0


# ---------------------------------------------------------------------------------------- server
@dataclass
class ZOOptions(base.Weighted):
    seeds: int = option(1024, ge=1)  # K, the seed pool (FedKSeed: 1024 in the README, 4096 in the code)
    steps: int = option(200, ge=1)  # SPSA steps per client and round (tau; FedKSeed: 200 with batch size 1)
    eps: float = option(5e-4, gt=0)  # perturbation scale
    pro: bool = False  # FedKSeed-Pro: sample seeds by the probabilities the server sends
    params: list[str] = option([])  # globs of the tuned parameters; empty: every trainable one
    clip: float = option(0.0, ge=0)  # skip a step whose |L+ - L-| exceeds this (0: never)
    restore: str = option("copy", choices=("copy", "inplace"))  # after a perturbation: "copy" (exact) or
    # "inplace" (+eps -2eps +eps, a few ulps)


def _seed_range(k: int):
    def check(t: torch.Tensor) -> str | None:
        return None if len(t) == 0 or (int(t.min()) >= 0 and int(t.max()) < k) else f"has seed indices outside [0, {k})"
    return check


class ZO(base.StrategyBase):
    name = "zo"
    Options = ZOOptions
    Recipe = ZORecipe
    privacy = base.NO_PRIVACY.but(client_dp="it does not train through DP-SGD (its steps are zeroth-order estimates)",
                                  secure_aggregation=None)  # per-seed sums are summable

    def init_state(self, spec: base.ModelSpec) -> GlobalState:
        o = self.options
        self.names = selected(spec.initial, o.params)
        self.pool = derive_seed(self.settings.seed, "zo-pool")
        self.seeds = pool_seeds(self.pool, o.seeds)
        aux = {THETA0 + n: spec.initial[n].clone() for n in self.names}
        aux[ACC] = torch.zeros(o.seeds, dtype=torch.float64)
        if o.pro:
            aux[ABS_SUM] = torch.zeros(o.seeds, dtype=torch.float64)
            aux[COUNT] = torch.zeros(o.seeds, dtype=torch.float64)
        return GlobalState({k: v.clone() for k, v in spec.initial.items()}, aux)

    def configure(self, rnd: int, clients: list[base.ClientInfo], state: GlobalState) -> dict[str, Task]:
        o = self.options
        down = {ACC: state.aux[ACC]}
        if o.pro:
            down[PROBS] = pro_probabilities(state.aux[ABS_SUM], state.aux[COUNT]).float()
        digest = content_hash({n: state.tensors[n] for n in self.names})
        chosen = base.sample_clients(clients, self.settings.clients_per_round, self.settings.seed, rnd)
        return {c.client_id: base.train_task(self.settings, rnd, c.client_id, down, zo_pool=self.pool,
                                             zo_steps=o.steps, zo_eps=o.eps, zo_params=list(o.params), zo_clip=o.clip,
                                             zo_restore=o.restore, zo_hash=digest) for c in chosen}

    def upload_contract(self, state: GlobalState) -> Contract:
        n = self.options.steps
        return {SEEDS: TensorSpec((n,), torch.int32, _seed_range(self.options.seeds)),
                GRADS: TensorSpec((n,), torch.float32)}

    def sum_contract(self, state: GlobalState) -> Contract:
        k = self.options.seeds
        return {name: TensorSpec((k,), torch.float64) for name in BY_SEED[: 3 if self.options.pro else 1]}

    def aggregate(self, rnd: int, results: list[ClientResult], state: GlobalState) -> RoundOutcome:
        uploads = [(r.tensors[SEEDS], r.tensors[GRADS]) for r in results]
        p = weights([r.num_examples for r in results], self.options.weighting)
        aux = dict(state.aux)
        aux[ACC] = accumulate(state.aux[ACC], uploads, p, self._lr(rnd))
        if self.options.pro:
            aux[ABS_SUM], aux[COUNT] = pro_update(aux[ABS_SUM], aux[COUNT], uploads)
        return self._commit(rnd, aux, results, state)

    def aggregate_sum(self, rnd: int, total: Tensors, weight: float, results: list[ClientResult],
                      state: GlobalState) -> RoundOutcome:
        """Secure aggregation: G += lr * (sum of the weighted per-seed sums) / (sum of the weights)."""
        aux = dict(state.aux)
        aux[ACC] = state.aux[ACC] + self._lr(rnd) * total[BY_SEED[0]] / weight
        if self.options.pro:
            aux[ABS_SUM], aux[COUNT] = aux[ABS_SUM] + total[BY_SEED[1]], aux[COUNT] + total[BY_SEED[2]].round()
        return self._commit(rnd, aux, results, state)

    def _lr(self, rnd: int) -> float:
        return base.round_lr(self.settings.train, rnd, self.settings.rounds)  # the lr the clients stepped with

    def _commit(self, rnd: int, aux: Tensors, results: list[ClientResult], state: GlobalState) -> RoundOutcome:
        """theta^{t+1} rebuilt from theta_0 and the new scalars."""
        theta0 = {n: aux[THETA0 + n] for n in self.names}
        tensors = {**state.tensors, **rebuild(theta0, self.names, aux[ACC], self.seeds)}
        hashes = {r.metrics["model_hash"] for r in results if "model_hash" in r.metrics}
        metrics = {
            "seeds_used": float(torch.count_nonzero(aux[ACC])),
            "skipped_steps": sum(r.metrics.get("skipped_steps", 0.0) for r in results),
            "model_hashes_distinct": float(len(hashes)),  # 1: every client stepped from the same theta^t
            "model_hash": hashes.pop() if len(hashes) == 1 else -1.0,
        }
        return RoundOutcome(GlobalState(tensors, aux, rnd), metrics)
