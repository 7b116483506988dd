"""Pieces shared by the exact low-rank strategies (FLoRA, Fed-SB): which modules carry LoRA, content
hashes that clients verify, and what the server knows each client already holds.

Everything here is pure and works on name -> tensor dicts, so both strategies stay testable with tiny
fp64 tensors and keep their whole state in GlobalState (committed atomically with each round).
"""

from __future__ import annotations

import abc
import hashlib
import re
from dataclasses import dataclass

import torch

from fedadapt.core.codec import TensorSpec
from fedadapt.core.errors import ConfigError, ModelError, PayloadError
from fedadapt.models.lora_layers import LORA_FACTOR, base_weights, lora_layers

from .base import ClientInfo, ClientResult, Exported, GlobalState, Task, Tensors


@dataclass(frozen=True)
class LoraModule:
    out_features: int  # m
    in_features: int  # n
    rank: int  # the rank of the run config's adapter
    dtype: torch.dtype


def lora_modules(initial: Tensors) -> dict[str, LoraModule]:
    """The LoRA-adapted modules of a model spec, from its `<module>.lora_A/B.<adapter>.weight` tensors."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in initial.items():
        m = LORA_FACTOR.match(name)
        if m:
            factors.setdefault(m["module"], {})[m["factor"]] = t
    if not factors:
        raise ModelError("this strategy needs a LoRA model (adapter.kind = \"lora\")")
    out = {}
    for module, f in sorted(factors.items()):
        a, b = f["A"], f["B"]  # (r, n) and (m, r), as peft stores them
        out[module] = LoraModule(b.shape[0], a.shape[1], a.shape[0], a.dtype)
    return out


def factors_contract(modules: dict[str, LoraModule], rank: int) -> dict[str, TensorSpec]:
    """The upload contract of every module's LoRA factors at `rank`: `<module>.lora_A` (r, n), `.lora_B` (m, r)."""
    out = {}
    for m, i in modules.items():
        out[f"{m}.lora_A"] = TensorSpec((rank, i.in_features), i.dtype)
        out[f"{m}.lora_B"] = TensorSpec((i.out_features, rank), i.dtype)
    return out


def head_of(initial: Tensors) -> Tensors:
    """The trainable tensors that are not LoRA factors (the task head): these are plainly averaged."""
    return {k: v for k, v in initial.items() if not LORA_FACTOR.match(k)}


def global_factors(initial: Tensors, ranks: list[int] | None = None) -> Tensors:
    """The head of a model spec and its adapter's factors as `<module>.lora_A` / `.lora_B` (the global adapter of
    the strategies that average or fold factors); per-client `ranks`, if given, must not exceed its rank."""
    if ranks:
        rank = next(iter(lora_modules(initial).values())).rank
        if any(r > rank for r in ranks):
            raise ConfigError(f"strategy.ranks {ranks} exceed the global adapter.rank {rank}")
    tensors = {k: v.clone() for k, v in head_of(initial).items()}
    for name, t in initial.items():
        if name not in tensors:  # <module>.lora_A.<adapter>.weight -> <module>.lora_A
            tensors[name.rsplit(".", 2)[0]] = t.clone()
    return tensors


def content_hash(tensors: Tensors) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: equal iff bit-identical."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def hash_metric(digest: str) -> float:
    """The first 48 bits of a hex digest as a float: exact through JSON metrics, enough to compare."""
    return float(int(digest[:12], 16))


# What the server knows a client holds, as int64 scalars in GlobalState.aux (so it survives restarts).
def known(aux: Tensors, client: str, key: str, default: int = -1) -> int:
    t = aux.get(f"client/{client}/{key}")
    return default if t is None else int(t)


def remember(aux: Tensors, clients: list[str], key: str, value: int) -> None:
    for c in clients:
        aux[f"client/{c}/{key}"] = torch.tensor(value, dtype=torch.int64)


def remember_silent(aux: Tensors, asked: tuple[int, set[str]], rnd: int, results: list[ClientResult], key: str,
                    value: int) -> None:
    """`asked` = (round, clients asked in it). A client asked in round `rnd` that sent nothing valid may have
    restarted and lost what it held (or refused the task): record `value` for it, which makes the strategy
    send it the full state next time."""
    asked_rnd, ids = asked
    remember(aux, sorted(ids - {r.client_id for r in results}) if asked_rnd == rnd else [], key, value)


def client_rank(client: ClientInfo, clients: list[ClientInfo], ranks: list[int]) -> int:
    """`ranks` cycled over the available clients in id order, capped by a declared `max_lora_rank`."""
    ids = sorted(c.client_id for c in clients)
    r = ranks[ids.index(client.client_id) % len(ranks)]
    cap = client.capabilities.get("max_lora_rank")  # a client may declare it cannot train more
    return min(r, cap) if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else r


def nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def catch_up(state: GlobalState, version: int, dense: str, history: re.Pattern, pruned: str) -> Tensors:
    """What a client whose base is D^version needs to reach the state's round: the rounds' history since (aux
    entries matching `history`), or D itself (the state's tensors ending in `dense`), whichever is fewer bytes;
    D when the history it needs was pruned (aux[pruned])."""
    if version == state.round:
        return {}
    whole = {k: v for k, v in state.tensors.items() if k.endswith(dense)}
    if version >= int(state.aux[pruned]):
        since = {k: v for k, v in state.aux.items() if (g := history.match(k)) and int(g["round"]) > version}
        if nbytes(since) < nbytes(whole):
            return since
    return whole


def prune_history(aux: Tensors, pattern: re.Pattern, pruned_key: str, dense_bytes: int) -> None:
    """Keep the newest per-round entries of `aux` (keys matching `pattern`, whose `round` group names the
    round) only while their total stays below `dense_bytes`; rounds up to `aux[pruned_key]` are dropped, and a
    client older than that gets the dense state instead (FLoRA's stacks, Ferret's tables)."""
    by_round: dict[int, list[str]] = {}
    for k in aux:
        if g := pattern.match(k):
            by_round.setdefault(int(g["round"]), []).append(k)
    total = 0
    for rnd in sorted(by_round, reverse=True):
        total += nbytes({k: aux[k] for k in by_round[rnd]})
        if total >= dense_bytes:
            for k in [k for r, keys in by_round.items() if r <= rnd for k in keys]:
                del aux[k]
            aux[pruned_key] = torch.tensor(max(rnd, int(aux[pruned_key])), dtype=torch.int64)
            return


def exported_factors(tensors: Tensors, model: torch.nn.Module | None, scaling: float = 0.0, base: str = "") -> Exported:
    """A global state of `<module>.lora_A` (r, n) and `.lora_B` (m, r) factors, of any rank r, as LoRA at `scaling`
    (0: the module's own, adapter.alpha / adapter.rank); `<module><base>` (a folded change of the base weight in
    the factors' units, FedEx-LoRA's) as scaling times it; every other tensor (a head) as a parameter."""
    layers = {} if scaling else lora_layers(model)
    factors, delta, params = {}, {}, {}
    for name, t in tensors.items():
        if name.endswith(".lora_A"):
            m = name[: -len(".lora_A")]
            s = scaling or float(layers[m].scaling["default"])
            factors[m] = (t, tensors[m + ".lora_B"], s)
            if base and m + base in tensors:
                delta[m] = s * tensors[m + base]
        elif not name.endswith(".lora_B") and not (base and name.endswith(base)):
            params[name] = t
    return Exported(factors, delta, params)


class HeldBase(abc.ABC):
    """A client's copy of a base weight the server changes every round (FLoRA's merged delta, FedEx-LoRA's folded
    residuals): D^v per adapted module, brought up to the task's round from the task itself (D whole, or the missed
    rounds' low-rank history folded in order) and checked against the server's hash. The live weights are
    recomputed from W0 by the subclass, never drifted.

    A subclass names the task's config keys (`<key>_base_round`, `<key>_from`, `<key>_base_hash`), the suffix
    `dense` of D's tensors, the pattern `history` of a round's tensors (group "round"), what D and the history are
    called (`noun`, `steps`: errors and the metric catchup_<steps>_rounds) and `fold`, one round of history."""

    key = dense = noun = steps = ""
    history: re.Pattern

    def __init__(self, model: torch.nn.Module):
        self.weights = base_weights(model)
        self.w0 = {m: w.detach().clone() for m, w in self.weights.items()}
        layers = lora_layers(model)  # D in the LoRA factors' dtype, as on the server (its spec holds the factors)
        self.delta = {m: torch.zeros(w.shape, dtype=layers[m].lora_A["default"].weight.dtype)
                      for m, w in self.weights.items()}
        self.version = 0

    @abc.abstractmethod
    def fold(self, d: torch.Tensor, tensors: Tensors, rnd: int, module: str) -> torch.Tensor:
        """`d` with round `rnd`'s history of `module` (from the task's `tensors`) folded in."""

    def sync(self, task: Task) -> dict[str, float]:
        t, cfg = task.tensors, task.config
        target = int(cfg.get(f"{self.key}_base_round", task.round))
        dense = {m: t[m + self.dense] for m in self.delta if m + self.dense in t}
        rounds = sorted({int(g["round"]) for g in map(self.history.match, t) if g})
        done = {"catchup_dense": 0.0, f"catchup_{self.steps}_rounds": 0.0}
        if dense:
            if dense.keys() != self.delta.keys():
                raise PayloadError(f"task has the {self.noun} of only some modules")
            self.delta = {m: d.clone() for m, d in dense.items()}
            done["catchup_dense"] = 1.0
        elif rounds:
            start = int(cfg.get(f"{self.key}_from", self.version))
            if self.version < start:
                raise PayloadError(f"this client's base is at round {self.version}, but the task's {self.steps}s "
                                   f"start after round {start}")
            for rnd in (r for r in rounds if r > self.version):
                for m in self.delta:
                    self.delta[m] = self.fold(self.delta[m], t, rnd, m)
                done[f"catchup_{self.steps}_rounds"] += 1
        elif self.version != target:
            raise PayloadError(f"this client's base is at round {self.version}, the task needs round {target}")
        self.version = max(self.version, target)
        want = cfg.get(f"{self.key}_base_hash")
        if want is not None and content_hash(self.delta) != want:
            raise PayloadError(f"{self.noun} out of step with the coordinator at round {target}")
        return done

