"""Fed-SB (ALGORITHMS.md §4): LoRA-SB with frozen B and A shared by all clients; only the r x r core R
(and the task head) trains and travels, and averaging R is exactly averaging the updates B R_i A.

Rounds before the initialisation exists are init rounds: the selected clients send the summed
gradients of the target weights on `init_samples` local examples; the server forms the sign step
dW = -init_lr * sign(sum_k G_k), takes its exact rank-r SVD dW = B R0 A and ships the frozen B, A with
R0. That is the reference's LoRA-SB init, computed federatedly instead of on pooled data (§4.7).
With `init_upload = "sign"` a client sends only the signs of its G_k, one bit per weight (32x fewer
bytes), and the server takes their majority vote sign(sum_k sign G_k), signSGD's vote; with one init
client both give the same step (up to gradient entries that are exactly 0, which vote negative).
From then on each round averages R (example-weighted by default, uniform as an option, §4.7); a
client's message is sum over modules of r^2 numbers plus the head, whatever the number of clients.
B and A reach each client once, with their content hash in every task; clients refuse others.

alpha = r (s = 1) is fixed by models/lorasb.py; the rank is the run's adapter.rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedadapt.client.trainer import evaluate, train_config, train_local
from fedadapt.core.codec import Contract, TensorSpec, contract_of
from fedadapt.core.errors import ConfigError, ModelError, PayloadError
from fedadapt.models.adapters import adapter_state
from fedadapt.models.lora_layers import load_named
from fedadapt.models.lorasb import attach_lorasb, frozen_factors, lorasb_init, target_linears

from .base import (
    ClientInfo,
    ClientResult,
    GlobalState,
    ModelSpec,
    RoundOutcome,
    StrategyBase,
    Task,
    register,
    sample_clients,
    train_task,
)
from .fedavg import weighted_average, weights
from .lowrank import content_hash, head_of, known, lora_modules, remember

B, A, R, GRAD, SIGNS = ".lorasb_B", ".lorasb_A", ".lorasb_R", ".grad", ".grad_signs"
FROZEN_HASH = "fedsb/frozen_sha256"  # aux: sha256 of B and A, checked every round (uint8[32])


@dataclass
class FedSBOptions:
    weighting: str = "examples"  # averaging of R and the head: "examples" (n_k) or "uniform" (the reference)
    init_clients: int = 0  # clients sending gradients for the initialisation; 0: clients_per_round
    init_samples: int = 32  # examples per init client (the reference: 50-550 in total)
    init_lr: float = 1e-3  # eta_eff of the approximated first (sign) step
    init_upload: str = "gradient"  # init message: "gradient" (fp32, as the reference) or "sign" (1 bit per weight)

    def __post_init__(self) -> None:
        if self.weighting not in ("examples", "uniform"):
            raise ConfigError(f"strategy.weighting must be 'examples' or 'uniform', got {self.weighting!r}")
        if self.init_upload not in ("gradient", "sign"):
            raise ConfigError(f"strategy.init_upload must be 'gradient' or 'sign', got {self.init_upload!r}")
        if self.init_clients < 0 or self.init_samples <= 0 or not self.init_lr > 0:
            raise ConfigError("strategy.init_clients must be >= 0, strategy.init_samples and strategy.init_lr > 0")


def frozen_hash(tensors: dict[str, torch.Tensor]) -> str:
    return content_hash({k: v for k, v in tensors.items() if k.endswith((B, A))})


def pack_signs(g: torch.Tensor) -> torch.Tensor:
    """One bit per entry, 1 where g > 0, packed 8 to a byte (numpy's packbits, big-endian bit order)."""
    return torch.from_numpy(np.packbits((g > 0).flatten().numpy()))


def unpack_votes(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The +1/-1 votes of pack_signs' bytes; the padding bits of the last byte are dropped."""
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=n)).reshape(shape).double() * 2 - 1


class FedSBRecipe:
    """Client side: init rounds send gradients; later rounds train R (and the head) only."""

    def prepare(self, model: torch.nn.Module, task: Task) -> None:
        t, want = task.tensors, task.config.get("fedsb_hash")
        modules = sorted({k[: -len(R)] for k in t if k.endswith(R)})
        if any(m + B in t for m in modules):
            if want is not None and frozen_hash(t) != want:
                raise PayloadError("frozen B/A do not match their content hash")
            attach_lorasb(model, {m: (t[m + B], t[m + A], t[m + R]) for m in modules})
        elif modules and (want is None or content_hash(frozen_factors(model)) != want):
            raise PayloadError("this client does not hold the run's frozen B/A")
        load_named(model, {k: v for k, v in t.items() if not k.endswith((B, A))})

    def train(self, model: torch.nn.Module, data: Any, task: Task, privacy: Any = None) -> ClientResult:
        if task.config.get("fedsb_phase") == "init":
            args = (model, data, int(task.config["fedsb_samples"]), int(task.config.get("batch_size", 32)),
                    int(task.config["seed"]))
            grads, loss = (init_gradients(*args) if privacy is None  # DP: clipped, noised (fedadapt.privacy)
                           else privacy.private_gradients(*args, train_config(task.config)))
            if task.config.get("fedsb_upload") == "sign":
                grads = {k[: -len(GRAD)] + SIGNS: pack_signs(g) for k, g in grads.items()}
            return ClientResult("", len(data), grads, {"loss": loss})
        trainer = train_local if privacy is None else privacy.train_local
        metrics = trainer(model, data, train_config(task.config), task.config["seed"])
        return ClientResult("", len(data), adapter_state(model), metrics)

    def evaluate(self, model: torch.nn.Module, data: Any, task: Task) -> dict[str, float]:
        return evaluate(model, data, int(task.config.get("batch_size", 128)))


def init_gradients(model: torch.nn.Module, data: Any, samples: int, batch_size: int, seed: int
                   ) -> tuple[dict[str, torch.Tensor], float]:
    """Sum over batches of the mean-loss gradient of every target weight, on `samples` seeded examples."""
    bases = target_linears(model)
    subset = data.sample(samples, seed)
    model.eval()  # no dropout: a deterministic estimate
    for w in (lin.weight for lin in bases.values()):
        w.requires_grad_(True)
    total = 0.0
    try:
        for start in range(0, len(subset), batch_size):
            inputs, labels = subset.batch(torch.arange(start, min(start + batch_size, len(subset))))
            loss = F.cross_entropy(model(**inputs), labels)
            loss.backward()
            total += float(loss.detach()) * len(labels)
        grads = {m + GRAD: lin.weight.grad.detach().clone() for m, lin in bases.items()}
    finally:
        for lin in bases.values():
            lin.weight.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    return grads, total / max(len(subset), 1)


@register("fedsb", FedSBRecipe)
class FedSB(StrategyBase):
    Options = FedSBOptions
    _asked: tuple[int, set[str]] = (0, set())  # (round, clients asked in it): set by configure

    def init_state(self, spec: ModelSpec) -> GlobalState:
        self.modules = lora_modules(spec.initial)
        return GlobalState({k: v.clone() for k, v in head_of(spec.initial).items()})

    @staticmethod
    def initialised(state: GlobalState) -> bool:
        return FROZEN_HASH in state.aux

    def configure(self, rnd: int, clients: list[ClientInfo], state: GlobalState) -> dict[str, Task]:
        if not self.initialised(state):
            k = self.options.init_clients or self.settings.clients_per_round
            return {c.client_id: train_task(self.settings, rnd, c.client_id, state.tensors, fedsb_phase="init",
                                            fedsb_samples=self.options.init_samples,
                                            fedsb_upload=self.options.init_upload)
                    for c in sample_clients(clients, k, self.settings.seed, rnd)}
        chosen = sample_clients(clients, self.settings.clients_per_round, self.settings.seed, rnd)
        self._asked = (rnd, {c.client_id for c in chosen})  # a hint for aggregate; not state
        light = {k: v for k, v in state.tensors.items() if not k.endswith((B, A))}  # R and the head
        digest = frozen_hash(state.tensors)
        return {c.client_id: train_task(self.settings, rnd, c.client_id,
                                        light if known(state.aux, c.client_id, "frozen", 0) else state.tensors,
                                        fedsb_phase="train", fedsb_hash=digest) for c in chosen}

    def upload_contract(self, state: GlobalState) -> Contract:
        if not self.initialised(state):  # only the gradients of the target weights (or their signs) travel
            if self.options.init_upload == "sign":
                return {m + SIGNS: TensorSpec((-(-i.out_features * i.in_features // 8),), torch.uint8)
                        for m, i in self.modules.items()}
            return {m + GRAD: TensorSpec((i.out_features, i.in_features), i.dtype) for m, i in self.modules.items()}
        return contract_of({k: v for k, v in state.tensors.items() if not k.endswith((B, A))})

    def aggregate(self, rnd: int, results: list[ClientResult], state: GlobalState) -> RoundOutcome:
        if not self.initialised(state):
            return self._initialise(rnd, results, state)
        digest = frozen_hash(state.tensors)
        if bytes(state.aux[FROZEN_HASH].tolist()).hex() != digest:
            raise ModelError("the server's frozen B/A no longer match their recorded hash")
        p = weights([r.num_examples for r in results], self.options.weighting)
        avg = weighted_average([r.tensors for r in results], p)  # R per module and the head
        frozen = {k: v for k, v in state.tensors.items() if k.endswith((B, A))}
        aux = dict(state.aux)
        remember(aux, [r.client_id for r in results], "frozen", 1)
        # a client asked this round that sent nothing valid may have restarted and lost B/A: resend them
        asked_rnd, asked = self._asked
        remember(aux, sorted(asked - {r.client_id for r in results}) if asked_rnd == rnd else [], "frozen", 0)
        return RoundOutcome(GlobalState({**avg, **frozen}, aux, rnd), {})

    def _initialise(self, rnd: int, results: list[ClientResult], state: GlobalState) -> RoundOutcome:
        tensors = dict(state.tensors)
        kept = []
        for m, info in self.modules.items():
            shape = (info.out_features, info.in_features)
            g = torch.stack([unpack_votes(r.tensors[m + SIGNS], shape) if self.options.init_upload == "sign"
                             else r.tensors[m + GRAD].double() for r in results]).sum(dim=0)
            b, a, r0, energy = lorasb_init(-self.options.init_lr * torch.sign(g), info.rank)
            # row-major like every decoded copy: a column-major B (as LAPACK returns it) would take another
            # BLAS path in the forward pass and break bit-equality between server and clients
            tensors[m + B], tensors[m + A], tensors[m + R] = (x.to(info.dtype).contiguous() for x in (b, a, r0))
            kept.append(energy)
        digest = frozen_hash(tensors)
        aux = {**state.aux, FROZEN_HASH: torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8)}
        return RoundOutcome(GlobalState(tensors, aux, rnd),
                            {"init_clients": float(len(results)), "init_energy_kept": sum(kept) / len(kept)})
