"""Simulated poisoning (`[attack]`): a fixed set of malicious clients, chosen from the run seed.

Attacks wrap what an honest client does, so they work with every strategy unchanged:

* `label-flip` poisons the data: a malicious client trains honestly on labels y -> C - 1 - y.
* the others post-process the honest upload `u` of a malicious client, given the tensors `g` it was
  sent (zero where it was sent none of that name):
  * `sign-flip`: g - scale * (u - g)    the honest update reversed and scaled
  * `scale`:     g + scale * (u - g)    the honest update boosted
  * `random`:    g + scale * z          z ~ N(0, 1), seeded per (round, client, tensor)
  * `reverse-ranking` (FRL's threat model, §5.3): the malicious clients of a round collude: they vote
    among their honest rankings and each sends the reverse of that ranking.

The float attacks touch float tensors only and `reverse-ranking` integer ones; an attack that finds
nothing it can change is a configuration error rather than a silently honest run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from safetensors.torch import save

from fedadapt.core import codec, rng
from fedadapt.core.config import AttackConfig
from fedadapt.core.errors import ConfigError
from fedadapt.models.classifier import Features
from fedadapt.runtime.engine import ResultMessage, TaskMessage, Transport
from fedadapt.runtime.executor import REFUSED
from fedadapt.strategies.base import ClientInfo, Tensors
from fedadapt.strategies.frl import vote

FLOAT_ATTACKS = ("sign-flip", "scale", "random")


def choose_malicious(client_ids, attack: AttackConfig, seed: int) -> set[str]:
    """round(fraction * N) clients, a pure function of the seed and the set of client ids."""
    ids = sorted(client_ids)
    m = round(attack.fraction * len(ids)) if attack.kind != "none" else 0
    return {ids[i] for i in rng.permutation(rng.derive_seed(seed, "attack"), len(ids))[:m].tolist()}


def poison_data(clients: dict[str, Features], malicious: set[str], attack: AttackConfig,
                num_classes: int) -> dict[str, Features]:
    """The clients' data with the labels of malicious clients flipped, for `label-flip`."""
    if attack.kind != "label-flip":
        return clients
    return {cid: Features(d.inputs, num_classes - 1 - d.labels) if cid in malicious else d
            for cid, d in clients.items()}


def tamper(kind: str, honest: Tensors, sent: Tensors, scale: float, seed: int) -> Tensors:
    """One malicious client's float attack on its honest upload (integer tensors are kept)."""
    if all(not u.is_floating_point() for u in honest.values()):
        raise ConfigError(f"attack.kind {kind!r} changes float tensors, but this strategy uploads none "
                          "(for FRL use 'reverse-ranking')")
    out = dict(honest)
    for name, u in honest.items():
        if not u.is_floating_point():
            continue
        g = sent.get(name)
        g = g.to(u.dtype) if g is not None and g.shape == u.shape else torch.zeros_like(u)
        if kind == "sign-flip":
            out[name] = g - scale * (u - g)
        elif kind == "scale":
            out[name] = g + scale * (u - g)
        else:  # random
            out[name] = g + scale * rng.normal(rng.derive_seed(seed, name), u.shape, dtype=u.dtype)
    return out


def forged_upload(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """What a malicious client sends: plain safetensors, whatever the values (NaN and Inf included: an honest
    client's executor would refuse to send them, an attacker does; the engine's decode rejects them)."""
    return save({k: v.detach().contiguous() for k, v in tensors.items()})


def reverse_rankings(honest: list[Tensors]) -> Tensors:
    """The colluders' common upload: per layer, the reverse of the vote among their honest rankings."""
    first = honest[0]
    if any(t.is_floating_point() or t.dim() != 1 for t in first.values()):
        raise ConfigError("attack.kind 'reverse-ranking' needs a strategy that uploads rankings (strategy 'frl')")
    return {name: vote([h[name] for h in honest]).flip(0) for name in first}


class AttackedTransport:
    """A Transport whose malicious clients' results are replaced by the attack's, before the engine
    sees them; the engine validates and aggregates them like any other result."""

    def __init__(self, inner: Transport, attack: AttackConfig, malicious: set[str], seed: int):
        self.inner, self.attack, self.malicious, self.seed = inner, attack, malicious, seed

    def clients(self) -> list[ClientInfo]:
        return self.inner.clients()

    def run(self, tasks: list[TaskMessage], *, timeout: float | None) -> list[ResultMessage]:
        replies = self.inner.run(tasks, timeout=timeout)
        # a malicious client whose own training sent no update (e.g. it diverged) has nothing to attack with
        honest = {r.client_id: codec.decode(r.payload) for r in replies
                  if r.client_id in self.malicious and REFUSED not in r.metrics}
        bad = [r for r in replies if r.client_id in honest]
        if not bad or self.attack.kind not in (*FLOAT_ATTACKS, "reverse-ranking"):
            return replies
        if self.attack.kind == "reverse-ranking":
            common = reverse_rankings([honest[r.client_id] for r in bad])
            forged = {cid: common for cid in honest}
        else:
            sent = {t.client_id: t.payload for t in tasks}
            forged = {r.client_id: tamper(self.attack.kind, honest[r.client_id], codec.decode(sent[r.client_id]),
                                          self.attack.scale, rng.derive_seed(self.seed, "attack", r.round, r.client_id))
                      for r in bad}
        # a forged update that overflows to Inf is sent as it is, and rejected by the engine like any other
        return [replace(r, payload=forged_upload(forged[r.client_id])) if r.client_id in forged else r
                for r in replies]


def with_attack(transport: Transport, attack: AttackConfig, malicious: set[str], seed: int) -> Transport:
    return AttackedTransport(transport, attack, malicious, seed) if malicious else transport
