"""FFA-LoRA (ALGORITHMS.md §10): A frozen at its shared random init, only B (and the task head) trained and
averaged.

    B^{t+1} = sum_i p_i B_i         s B^{t+1} A = sum_i p_i s B_i A

Averaging is exact by construction (A is the same everywhere and never changes), the upload is B alone
(m r numbers per module, against r (m + n) for LoRA), and under DP-SGD only B's gradient is clipped and
noised: the noise enters the weight linearly, s N_B A, with no noise x noise term.

A is the run's seeded peft init (Kaiming-uniform, the `lora_A` of the model spec), which every party builds
identically: it does not travel unless a client lacks it. Each task carries A's content hash; a client whose
A differs refuses the task, and the server then sends A with that client's next task (as Fed-SB does with its
frozen factors). The server checks every round that its own A still matches the hash recorded at the start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedadapt.core.codec import Contract, contract_of
from fedadapt.core.errors import ModelError, PayloadError
from fedadapt.models.lora_layers import factor_state, load_named, lora_layers
from fedadapt.privacy.compat import Support
from fedadapt.training.loop import train_config, train_local

from . import base
from .aggregate import weighted_average, weights
from .base import ClientResult, GlobalState, RoundOutcome, Task, Tensors
from .lowrank import content_hash, exported_factors, global_factors, known, lora_modules, remember, remember_silent

A_HASH = "ffa/a_sha256"  # aux: sha256 of the frozen A of every module (uint8[32])


def a_hash(tensors: Tensors) -> str:
    return content_hash({k: v for k, v in tensors.items() if k.endswith(".lora_A")})


@dataclass
class FFAOptions(base.Weighted):  # p_i over the round's clients
    pass


class FFARecipe(base.RecipeBase):
    """Client side: keep A frozen (load it if the task carries it), load B and the head, train B and the head."""

    def prepare(self, model: torch.nn.Module, task: Task) -> None:
        t, layers = task.tensors, lora_layers(model)
        with torch.no_grad():
            for m, layer in layers.items():
                a = layer.lora_A["default"].weight
                a.requires_grad_(False)  # frozen: not trained, not in the optimiser, not uploaded
                if m + ".lora_A" in t:
                    a.copy_(t[m + ".lora_A"])
                if m + ".lora_B" in t:
                    layer.lora_B["default"].weight.copy_(t[m + ".lora_B"])
        want = task.config.get("ffa_a_hash")
        held = {m + ".lora_A": layer.lora_A["default"].weight for m, layer in layers.items()}
        if want is not None and a_hash(held) != want:
            raise PayloadError("this client's frozen A does not match the run's (its hash differs)")
        load_named(model, {k: v for k, v in t.items() if not k.endswith((".lora_A", ".lora_B"))})

    def train(self, model: torch.nn.Module, data: Any, task: Task, privacy: Any = None) -> ClientResult:
        trainer = train_local if privacy is None else privacy.train_local  # DP-SGD on B and the head only
        metrics = trainer(model, data, train_config(task.config), task.config["seed"])
        return ClientResult("", len(data), factor_state(model), metrics)  # B and the head: A does not train


class FFA(base.StrategyBase):
    name = "ffa-lora"
    Options = FFAOptions
    Recipe = FFARecipe
    privacy = Support()  # B trains by DP-SGD; B and the head are model tensors the server may clip, noise and sum
    _asked: tuple[int, set[str]] = (0, set())  # (round, clients asked in it): set by configure

    def init_state(self, spec: base.ModelSpec) -> GlobalState:
        self.modules = lora_modules(spec.initial)
        tensors = global_factors(spec.initial)
        digest = a_hash(tensors)
        return GlobalState(tensors, {A_HASH: torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8)})

    def configure(self, rnd: int, clients: list[base.ClientInfo], state: GlobalState) -> dict[str, Task]:
        chosen = base.sample_clients(clients, self.settings.clients_per_round, self.settings.seed, rnd)
        self._asked = (rnd, {c.client_id for c in chosen})  # a hint for aggregate; not state
        light = {k: v for k, v in state.tensors.items() if not k.endswith(".lora_A")}  # B and the head
        digest = a_hash(state.tensors)
        # a fresh client built A from the run's seed (1); one that refused or went silent may not hold it (0)
        return {c.client_id: base.train_task(self.settings, rnd, c.client_id,
                                             light if known(state.aux, c.client_id, "a", 1) else state.tensors,
                                             ffa_a_hash=digest) for c in chosen}

    def upload_contract(self, state: GlobalState) -> Contract:
        return contract_of({k: v for k, v in state.tensors.items() if not k.endswith(".lora_A")})

    def aggregate(self, rnd: int, results: list[ClientResult], state: GlobalState) -> RoundOutcome:
        frozen = {k: v for k, v in state.tensors.items() if k.endswith(".lora_A")}
        if bytes(state.aux[A_HASH].tolist()).hex() != a_hash(frozen):
            raise ModelError("the server's frozen A no longer matches its recorded hash")
        p = weights([r.num_examples for r in results], self.options.weighting)
        avg = weighted_average([r.tensors for r in results], p)  # B of every module and the head
        aux = dict(state.aux)
        remember(aux, [r.client_id for r in results], "a", 1)
        remember_silent(aux, self._asked, rnd, results, "a", 0)  # it may not hold A: send it next time
        return RoundOutcome(GlobalState({**avg, **frozen}, aux, rnd), {})

    def export(self, tensors: Tensors, model: torch.nn.Module) -> base.Exported:
        """A plain LoRA: the shared A, the averaged B, the run's scaling; the head as is."""
        return exported_factors(tensors, model)

