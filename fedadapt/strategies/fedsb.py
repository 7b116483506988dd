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

from fedadapt.core.codec import Contract, TensorSpec, contract_of
from fedadapt.core.config import option
from fedadapt.core.errors import ModelError, PayloadError
from fedadapt.models.adapters import adapter_state
from fedadapt.models.device import device_of, on_device
from fedadapt.models.lora_layers import load_named
from fedadapt.models.lorasb import SCALE, attach_lorasb, frozen_factors, lorasb_init, out_in, target_linears
from fedadapt.privacy.compat import Support
from fedadapt.training.loop import train_config, train_local

from . import base
from .aggregate import weighted_average, weights
from .base import ClientResult, GlobalState, RoundOutcome, Task, Tensors
from .lowrank import content_hash, head_of, known, lora_modules, remember, remember_silent

B, A, R, GRAD, SIGNS = ".lorasb_B", ".lorasb_A", ".lorasb_R", ".grad", ".grad_signs"
FROZEN_HASH = "fedsb/frozen_sha256"  # aux: sha256 of B and A, checked every round (uint8[32])


@dataclass
class FedSBOptions(base.Weighted):  # averaging of R and the head ("uniform": the reference)
    init_clients: int = option(0, ge=0)  # clients sending gradients for the initialisation; 0: clients_per_round
    init_samples: int = option(32, gt=0)  # examples per init client (the reference: 50-550 in total)
    init_lr: float = option(1e-3, gt=0)  # eta_eff of the approximated first (sign) step
    init_upload: str = option("gradient", choices=("gradient", "sign"))  # init message: "gradient" (fp32, as
    # the reference) or "sign" (1 bit per weight)


SIGN_VOTES = ("strategy.init_upload = 'sign' sends packed sign bits, which the server must unpack one client at a "
              "time: they can be neither masked into a sum nor clipped and noised; use init_upload = 'gradient' "
              "with secure aggregation or central DP")


def frozen_hash(tensors: dict[str, torch.Tensor]) -> str:
    return content_hash({k: v for k, v in tensors.items() if k.endswith((B, A))})


def pack_signs(g: torch.Tensor) -> torch.Tensor:
    """One bit per entry, 1 where g > 0, packed 8 to a byte (numpy's packbits, big-endian bit order)."""
    return torch.from_numpy(np.packbits((g > 0).flatten().numpy()))


def unpack_votes(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The +1/-1 votes of pack_signs' bytes; the padding bits of the last byte are dropped."""
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=n)).reshape(shape).double() * 2 - 1


class FedSBRecipe(base.RecipeBase):
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

    def dp_plan(self, dp: Any, n: int, task: Task) -> Any:
        """An init task releases one noised sum of clipped gradients on a Poisson sample of init_samples."""
        if task.config.get("fedsb_phase") == "init":
            return dp.plan_one_step(n, int(task.config["fedsb_samples"]))
        return super().dp_plan(dp, n, task)


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
            batch = subset.batch(torch.arange(start, min(start + batch_size, len(subset))))
            inputs, labels = on_device(batch, device_of(model))
            loss = data.loss(model(**inputs), labels)
            loss.backward()
            total += float(loss.detach()) * len(labels)
        grads = {m + GRAD: out_in(lin, lin.weight.grad).detach().clone() for m, lin in bases.items()}
    finally:
        for lin in bases.values():
            lin.weight.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    return grads, total / max(len(subset), 1)


class FedSB(base.StrategyBase):
    name = "fedsb"
    Options = FedSBOptions
    Recipe = FedSBRecipe
    privacy = Support()  # R trains by DP-SGD; init gradients are clipped and noised; R and sums are summable
    _asked: tuple[int, set[str]] = (0, set())  # (round, clients asked in it): set by configure

    def privacy_support(self) -> Support:
        if self.options.init_upload == "sign":
            return self.privacy.but(central_dp=SIGN_VOTES, secure_aggregation=SIGN_VOTES)
        return self.privacy

    def sums_uploads(self, state: GlobalState) -> bool:
        return not self.initialised(state)  # the init round steps from the sum of the clients' gradients

    def init_state(self, spec: base.ModelSpec) -> GlobalState:
        self.modules = lora_modules(spec.initial)
        return GlobalState({k: v.clone() for k, v in head_of(spec.initial).items()})

    @staticmethod
    def initialised(state: GlobalState) -> bool:
        return FROZEN_HASH in state.aux

    def configure(self, rnd: int, clients: list[base.ClientInfo], state: GlobalState) -> dict[str, Task]:
        if not self.initialised(state):
            k = self.options.init_clients or self.settings.clients_per_round
            return {c.client_id: base.train_task(self.settings, rnd, c.client_id, state.tensors,
                                                 fedsb_phase="init", fedsb_samples=self.options.init_samples,
                                                 fedsb_upload=self.options.init_upload)
                    for c in base.sample_clients(clients, k, self.settings.seed, rnd)}
        chosen = base.sample_clients(clients, self.settings.clients_per_round, self.settings.seed, rnd)
        self._asked = (rnd, {c.client_id for c in chosen})  # a hint for aggregate; not state
        light = {k: v for k, v in state.tensors.items() if not k.endswith((B, A))}  # R and the head
        digest = frozen_hash(state.tensors)
        return {c.client_id: base.train_task(self.settings, rnd, c.client_id,
                                             light if known(state.aux, c.client_id, "frozen", 0) else state.tensors,
                                             fedsb_phase="train", fedsb_hash=digest) for c in chosen}

    def export(self, tensors: Tensors, model: torch.nn.Module) -> base.Exported:
        """LoRA-SB's B R A as LoRA factors: B, and R A (formed in fp64), at the fixed scaling; the head as is."""
        if not any(k.endswith(R) for k in tensors):
            raise ModelError("this Fed-SB run never finished its initialisation round: there is no adapter yet")
        modules = sorted({k[: -len(R)] for k in tensors if k.endswith(R)})
        factors = {m: ((tensors[m + R].double() @ tensors[m + A].double()).to(tensors[m + A].dtype), tensors[m + B],
                       SCALE) for m in modules}
        return base.Exported(factors, params={k: v for k, v in tensors.items() if not k.endswith((B, A, R))})

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
        remember_silent(aux, self._asked, rnd, results, "frozen", 0)  # it may have lost B/A: resend them
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
