"""Client DP-SGD with opacus on exactly the model's trainable parameters (LoRA factors, Fed-SB's R, a head,
FRL's supermask scores).

Per-example gradients come from opacus' GradSampleModule hooks (LoRA-SB's core R has its own grad
sampler below; supermask scores, which opacus cannot hook, get theirs from `_SupermaskSamples`); opacus' DPOptimizer clips each example's gradient to `max_grad_norm`, sums, adds
Gaussian noise N(0, (z C)^2) and divides by the expected batch size. Batches are Poisson-sampled
(each example independently with rate q = batch_size / n), which is what the accountant assumes.

The hooks are attached for one local run and removed after it, because virtual clients share one model.
After every run a guard checks that each trainable tensor moved and no frozen tensor or buffer did: the
known opacus + peft failure mode is an update that is silently computed on the wrong tensors.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from fedadapt.core.errors import ModelError
from fedadapt.core.rng import derive_seed, generator
from fedadapt.models.device import device_of, on_device
from fedadapt.models.lorasb import SCALE, LoraSBLinear, out_in, target_linears
from fedadapt.models.supermask import Supermask

from .ledger import BUDGET_SLACK, Ledger, calibrate

_registered = False


def _register_lorasb() -> None:
    """Per-example gradient of R in y = W0 x + s B (R (A x)): sum over positions of (B^T g) (A x)^T."""
    global _registered
    if _registered:
        return
    from opacus.grad_sample import register_grad_sampler

    @register_grad_sampler(LoraSBLinear)
    def _lorasb_grad_sample(layer: LoraSBLinear, activations: list[torch.Tensor], backprops: torch.Tensor):
        x = activations[0].to(backprops.dtype)
        u = F.linear(x, layer.lorasb_A)  # (n, ..., r): the input of R
        gv = SCALE * backprops @ layer.lorasb_B  # (n, ..., r): the gradient at the output of R
        return {layer.lorasb_R: torch.einsum("n...i,n...j->nij", gv, u)} if layer.lorasb_R.requires_grad else {}

    _registered = True


@dataclass
class DPSettings:
    """What one client applies; from the run's [privacy] section, carried in each task's config."""

    epsilon: float  # this client's budget
    delta: float
    noise_multiplier: float  # < 0: calibrated from epsilon over planned_rounds local runs
    max_grad_norm: float
    planned_rounds: int
    accountant: str = "rdp"

    @classmethod
    def from_task(cls, d: dict[str, Any]) -> DPSettings:
        return cls(float(d["epsilon"]), float(d["delta"]), float(d["noise_multiplier"]), float(d["max_grad_norm"]),
                   int(d["planned_rounds"]), str(d.get("accountant", "rdp")))


@dataclass
class Plan:
    sample_rate: float
    steps: int
    noise_multiplier: float


def plan(n: int, batch_size: int, local_steps: int, local_epochs: int, s: DPSettings) -> Plan:
    """Sampling rate, steps and noise of one local run on n examples (noise calibrated if not given)."""
    q = min(1.0, batch_size / n)
    steps = local_epochs * math.ceil(1 / q) if local_epochs > 0 else local_steps
    z = s.noise_multiplier
    if z < 0:
        z = calibrate(s.epsilon, s.delta, q, steps * max(s.planned_rounds, 1), s.accountant)
    return Plan(q, steps, z)


class ClientDP:
    """DP-SGD for one client: `train_local` is a drop-in for training.loop.train_local."""

    def __init__(self, settings: DPSettings, ledger: Ledger,
                 make_optimizer: Callable[[list[nn.Parameter], Any], torch.optim.Optimizer]):
        self.settings = settings
        self.ledger = ledger
        self.make_optimizer = make_optimizer

    def plan_for(self, n: int, cfg: Any) -> Plan:
        return plan(n, cfg.batch_size, cfg.local_steps, cfg.local_epochs, self.settings)

    def plan_one_step(self, n: int, samples: int) -> Plan:
        """One release of a noised sum of clipped gradients (`private_gradients`, e.g. Fed-SB's init): one
        Gaussian-mechanism step on a Poisson sample of rate samples / n. Calibrated noise gives it one planned
        participation's share of the budget: with the training noise, a high-rate step alone could exceed the
        budget and every such client would refuse."""
        q, s = min(1.0, samples / n), self.settings
        z = s.noise_multiplier
        if z < 0:
            z = calibrate(s.epsilon / max(s.planned_rounds, 1), s.delta, q, 1, s.accountant)
        return Plan(q, 1, z)

    def private_gradients(self, model: nn.Module, data: Any, samples: int, batch_size: int, seed: int,
                          cfg: Any) -> tuple[dict[str, torch.Tensor], float]:
        """DP version of strategies.fedsb.init_gradients: the sum over a Poisson sample of per-example
        gradients of the target weights, each example clipped (all modules together) to C, plus
        N(0, (z C)^2). The server only uses the sign of the sum, so its scale does not matter.

        Per-example gradients of a Linear are sum_t g_t a_t^T; materialising them for every example (as
        opacus' hooks do) costs examples x in x out per module. Their norms come from the identity
        ||sum_t g_t a_t^T||^2 = sum_{t,s} (g_t . g_s)(a_t . a_s) instead, and the clipped sum is one matmul.
        """
        p = self.plan_one_step(len(data), samples)
        c = self.settings.max_grad_norm
        bases = target_linears(model)
        device = device_of(model)
        was = {q: q.requires_grad for q in model.parameters()}
        seen: dict[str, list[torch.Tensor]] = {m: [] for m in bases}  # module -> [input, output gradient]

        def capture(name: str):
            def hook(_module, inputs, output):
                seen[name][:] = [inputs[0].detach()]
                output.register_hook(lambda g: seen[name].append(g.detach()))
            return hook

        for q in was:
            q.requires_grad_(False)
        handles = [lin.register_forward_hook(capture(m)) for m, lin in bases.items()]
        for lin in bases.values():
            lin.weight.requires_grad_(True)  # so that outputs carry gradients
        idx = (torch.rand(len(data), generator=generator(derive_seed(seed, "poisson"))) < p.sample_rate).nonzero()
        sums = {m: torch.zeros_like(out_in(lin), dtype=torch.float64) for m, lin in bases.items()}  # (out, in)
        total = 0.0
        try:
            model.eval()  # no dropout: a deterministic estimate
            for chunk in idx.squeeze(1).split(batch_size):
                inputs, labels = on_device(data.batch(chunk), device)
                loss = data.loss(model(**inputs), labels, reduction="sum")
                loss.backward()
                total += float(loss.detach())
                ag = {}
                for m, (a, g) in seen.items():
                    a, g = (a, g) if a.dim() == 3 else (a.unsqueeze(1), g.unsqueeze(1))  # (examples, positions, dim)
                    ag[m] = (a.reshape(a.shape[0], -1, a.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1]))
                norm2 = sum((g @ g.transpose(1, 2) * (a @ a.transpose(1, 2))).sum((1, 2)) for a, g in ag.values())
                norms = norm2.clamp(min=0).sqrt()
                factor = (c / (norms + 1e-6)).clamp(max=1.0) if math.isfinite(c) else torch.ones_like(norms)
                for m, (a, g) in ag.items():
                    sums[m] += torch.einsum("btj,bti->ji", g * factor[:, None, None].to(g.dtype), a).double()
                model.zero_grad(set_to_none=True)
        finally:
            for h in handles:
                h.remove()
            for q, flag in was.items():
                q.requires_grad_(flag)
                q.grad = None
        noise = generator(derive_seed(seed, "dp-noise"))
        std = p.noise_multiplier * c if p.noise_multiplier > 0 else 0.0
        grads = {m + ".grad": (g + (torch.normal(0.0, std, g.shape, generator=noise, dtype=torch.float64)
                                    if std > 0 else 0.0)).to(bases[m].weight.dtype) for m, g in sums.items()}
        self.ledger.record(p.noise_multiplier, p.sample_rate, p.steps)
        return grads, total / max(len(idx), 1)

    def train_local(self, model: nn.Module, data: Any, cfg: Any, seed: int) -> dict[str, float]:
        p = self.plan_for(len(data), cfg)
        before = _snapshot(model)
        metrics = dp_sgd(model, data, cfg, seed, p, self.settings.max_grad_norm, self.make_optimizer)
        _guard(model, before, p.noise_multiplier > 0 and p.steps > 0)
        self.ledger.record(p.noise_multiplier, p.sample_rate, p.steps)
        return {**metrics, "dp_noise_multiplier": p.noise_multiplier, "dp_sample_rate": p.sample_rate}


class Accounts:
    """The client side of client DP for one recipe: a ledger per client id (a simulation's virtual clients), or
    a daemon's single ledger kept on disk (client/state.py) with, optionally, its own cap over all its runs; and
    the decision to train a local run or refuse it for the budget."""

    def __init__(self, make_optimizer: Callable, ledger_file: Any = None, max_epsilon: float | None = None):
        self.make_optimizer = make_optimizer
        self.ledger_file = ledger_file  # survives restarts; saved before an update can leave the machine
        self.max_epsilon = max_epsilon  # a daemon's own cap over all its runs; None: the run's budget alone
        self.ledgers: dict[str, Ledger] = {}

    def begin(self, me: str, settings: dict[str, Any], plan: Callable[[ClientDP], Plan]
              ) -> tuple[ClientDP | None, dict[str, Any]]:
        """DP-SGD for client `me`'s next local run (`settings`: the task's privacy entry; `plan`: what the run
        will spend), or None and the metrics of a refusal when the run would take it past its budget."""
        s = DPSettings.from_task(settings)
        ledger = self._ledger(me, s)
        budget, whose = self._budget(s.epsilon)
        dp, after = None, math.inf
        if budget > 0:  # a daemon's cap that leaves less than the run's budget: noise is calibrated to it
            dp = ClientDP(replace(s, epsilon=min(s.epsilon, budget)), ledger, self.make_optimizer)
            p = plan(dp)
            after = ledger.would_spend(p.noise_multiplier, p.sample_rate, p.steps)
        if after > budget * (1 + BUDGET_SLACK):
            why = (f"privacy budget exhausted: epsilon {ledger.spent:.3f} of {budget:g} spent{whose}, this "
                   f"round would reach {after:.3f}")
            return None, {"refused": why, "dp_epsilon": ledger.spent, "dp_exhausted": 1.0}
        return dp, {}

    def end(self, dp: ClientDP, following: Plan) -> dict[str, float]:
        """After the run: the ledger saved, and the metrics that report it (`following`: a next run's plan,
        to say whether the client could afford one)."""
        if self.ledger_file is not None:
            self.ledger_file.save(dp.ledger)  # before the update can leave this machine
        budget = dp.settings.epsilon
        return {"dp_epsilon": dp.ledger.spent, "dp_delta": dp.settings.delta,
                "dp_exhausted": float(dp.ledger.would_spend(following.noise_multiplier, following.sample_rate,
                                                            following.steps) > budget * (1 + BUDGET_SLACK))}

    def _budget(self, run_epsilon: float) -> tuple[float, str]:
        """The epsilon this run may reach: the run's budget, or less if the daemon's own cap minus what its
        other runs spent is smaller (with a note for the refusal message)."""
        if self.max_epsilon is None or self.ledger_file is None:
            return run_epsilon, ""
        left = max(0.0, self.max_epsilon - self.ledger_file.spent_elsewhere())
        if left >= run_epsilon:
            return run_epsilon, ""
        return left, f" (this client's cap --max-epsilon {self.max_epsilon:g} minus {self.max_epsilon - left:.3f} " \
                     "spent in its other runs)"

    def _ledger(self, me: str, s: DPSettings) -> Ledger:
        if me not in self.ledgers:
            saved = self.ledger_file.load() if self.ledger_file is not None else None
            self.ledgers[me] = saved or Ledger(s.epsilon, s.delta, s.accountant)
        return self.ledgers[me]


def dp_sgd(model: nn.Module, data: Any, cfg: Any, seed: int, p: Plan, max_grad_norm: float,
           make_optimizer: Callable) -> dict[str, float]:
    """`p.steps` DP-SGD steps on Poisson batches; seeded (batches, dropout and noise) like train_local."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    _register_lorasb()
    params = [q for q in model.parameters() if q.requires_grad]
    supermask = _SupermaskSamples.of(model)
    bad = [] if supermask else [e for e in GradSampleModule.validate(model, strict=False)
                                if "LoraSBLinear" not in str(e)]
    if bad:
        raise ModelError(f"DP-SGD cannot train this model: {bad[0]}")
    n = len(data)
    device = device_of(model)
    # opacus multiplies noise by the clip; with noise 0 an infinite clip would give 0 * inf = NaN
    clip = max_grad_norm if math.isfinite(max_grad_norm) else sys.float_info.max
    gsm = supermask or GradSampleModule(model, loss_reduction="mean", strict=False)
    quiet = warnings.catch_warnings()  # the first hooked layer's input needs no gradient; torch says so each step
    quiet.__enter__()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    try:
        opt = DPOptimizer(make_optimizer(params, cfg), noise_multiplier=p.noise_multiplier, max_grad_norm=clip,
                          expected_batch_size=max(1, round(p.sample_rate * n)), loss_reduction="mean",
                          generator=generator(derive_seed(seed, "dp-noise")))
        sampler = generator(derive_seed(seed, "poisson"))
        model.train()
        total, seen = 0.0, 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "model"))
            for _ in range(p.steps):
                idx = (torch.rand(n, generator=sampler) < p.sample_rate).nonzero().squeeze(1)
                opt.zero_grad(set_to_none=True)
                if len(idx) == 0:  # an empty Poisson batch is still a step: noise only
                    for q in params:
                        q.grad_sample = torch.zeros((0, *q.shape), dtype=q.dtype)
                else:
                    inputs, labels = on_device(data.batch(idx), device)
                    loss = data.loss(gsm(**inputs), labels)
                    loss.backward()
                    if supermask:
                        supermask.fill(len(idx))
                    total += float(loss.detach()) * len(idx)
                    seen += len(idx)
                opt.step()
    finally:
        gsm._close()  # remove hooks and per-sample gradients: the shared model must come back clean
        quiet.__exit__(None, None, None)
        for q in params:
            q.grad = None
    return {"loss": total / max(seen, 1), "steps": float(p.steps), "examples": float(seen)}


class _SupermaskSamples:
    """Per-example gradients of supermask scores (models/supermask.py). Opacus cannot hook them: the module
    that owns the scores takes the frozen weight as input, not the batch. For a supermasked linear layer
    y = x (W * m(s))^T with the straight-through mask, example i's own loss has

        d loss_i / d s = W * sum_t g_it x_it^T       (g: the gradient at the layer's output, t: positions)

    Forward and backward hooks on the layers keep x and g; `fill` sets each scores' grad_sample, which
    opacus' DPOptimizer clips and noises as it does its own."""

    def __init__(self, model: nn.Module, layers: list[tuple[nn.Module, Supermask]]):
        self.model, self.layers = model, layers
        self.handles = [h for m, _ in layers for h in (
            m.register_forward_hook(lambda m, inputs, out: setattr(m, "_dp_x", inputs[0].detach())),
            m.register_full_backward_hook(lambda m, g_in, g_out: setattr(m, "_dp_g", g_out[0].detach())))]

    @classmethod
    def of(cls, model: nn.Module) -> _SupermaskSamples | None:
        """The sampler for `model` if it trains supermask scores, and only them; None if it has none."""
        layers = [(m, m.parametrizations.weight[0]) for m in model.modules()
                  if parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], Supermask)]
        if not layers:
            return None
        scores = {id(mask.scores) for _, mask in layers}
        other = [k for k, p in model.named_parameters() if p.requires_grad and id(p) not in scores]
        if other:
            raise ModelError(f"DP-SGD on supermask scores: {other[0]!r} trains too, which has no per-example gradient")
        return cls(model, layers)

    def __call__(self, **inputs):
        return self.model(**inputs)

    def fill(self, batch: int) -> None:
        for m, mask in self.layers:
            g = m._dp_g * batch  # the mean loss's gradient -> each example's own loss
            per = torch.einsum("n...o,n...i->noi", g, m._dp_x.to(g.dtype))
            mask.scores.grad_sample = per * m.parametrizations.weight.original

    def _close(self) -> None:
        for h in self.handles:
            h.remove()
        for m, mask in self.layers:
            for name in ("_dp_x", "_dp_g"):
                m.__dict__.pop(name, None)
            mask.scores.__dict__.pop("grad_sample", None)


def _snapshot(model: nn.Module):
    """Trainable tensors by value (they are small); frozen tensors and buffers by identity, storage and
    version counter, which every in-place write bumps (cloning a whole base model per run would cost more
    than the DP step)."""
    trainable = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: _stamp(v) for k, v in _frozen(model).items()}
    return trainable, frozen


def _frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in model.named_parameters() if not v.requires_grad}
    out.update({f"buffer:{k}": v for k, v in model.named_buffers()})
    return out


def _stamp(t: torch.Tensor) -> tuple[int, int, int]:
    return id(t), t.data_ptr(), t._version


def _guard(model: nn.Module, before, every_tensor_must_move: bool) -> None:
    """Trainable tensors changed (each one when noise was added), frozen tensors and buffers did not."""
    trainable, frozen = before
    now = _frozen(model)
    touched = [k for k, stamp in frozen.items() if k not in now or _stamp(now[k]) != stamp]
    if touched:
        raise ModelError(f"DP-SGD changed frozen tensor {touched[0]!r} ({len(touched)} in all): refusing the update")
    params = dict(model.named_parameters())
    still = [k for k, v in trainable.items() if torch.equal(v, params[k])]
    if still and (every_tensor_must_move or len(still) == len(trainable)):
        raise ModelError(f"DP-SGD left trainable tensor {still[0]!r} unchanged ({len(still)} of {len(trainable)}): "
                         "per-example gradients did not reach it")
