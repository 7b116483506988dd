"""The two protocols every strategy implements, the shared message types, and the base classes that
declare every optional hook with its default (nothing is discovered with hasattr).

Server sides are pure (tensors in, tensors out, no I/O) so they can be tested with tiny fp64 tensors
and driven by any transport: the in-process simulator, the gRPC coordinator or Flower.

Strategy state: the global tensors and every tensor a strategy keeps between rounds (FedAvgM's velocity,
FLoRA's stacks, FedAU's participation counts, ...) live in `GlobalState` (`tensors` and `aux`), which the
engine hands to each call and a coordinator commits atomically with the round. `state_dict()` holds what
is not a tensor (the privacy wrapper's ledgers); plain strategies keep nothing there.

This module imports no strategy: strategies/registry.py finds them by name.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from fedadapt.core.codec import Contract
from fedadapt.core.config import Section, option
from fedadapt.core.rng import derive_seed, permutation
from fedadapt.models.lora_layers import LORA_FACTOR, lora_layers
from fedadapt.privacy.compat import Support
from fedadapt.training.loop import evaluate, train_config

ClientId = str
Tensors = dict[str, torch.Tensor]


@dataclass
class ClientInfo:
    client_id: ClientId
    num_examples: int = 0
    capabilities: dict[str, Any] = field(default_factory=dict)


@dataclass
class Task:
    kind: str  # "train" | "evaluate"
    round: int
    config: dict[str, Any]
    tensors: Tensors


@dataclass
class ClientResult:
    client_id: ClientId
    num_examples: int
    tensors: Tensors
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ModelSpec:
    """What the server knows of the model: the adapter state every client starts from."""

    initial: Tensors


@dataclass
class GlobalState:
    tensors: Tensors  # the global adapter, broadcast to clients
    aux: Tensors = field(default_factory=dict)  # strategy state that stays on the server (e.g. momentum)
    round: int = 0  # last round aggregated


@dataclass
class RoundOutcome:
    state: GlobalState
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Exported:
    """A global state as every LoRA tool knows it (fedadapt.export writes it as a peft adapter or merges it).

    Per adapted module (fedadapt's module name, e.g. `encoder.base_model.model.model.layers.0.self_attn.q_proj`):
    LoRA factors A (r, in) and B (out, r) with their scaling (the module computes W x + scaling B A x), and a
    dense change of the base weight (out, in); plus the other trained tensors by parameter name (a classifier's
    head). `full`: every parameter of the model was trained (no adapter: merged export only)."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    base_delta: dict[str, torch.Tensor] = field(default_factory=dict)
    params: Tensors = field(default_factory=dict)
    full: bool = False


@dataclass
class RunSettings:
    """What every server strategy needs besides its own options."""

    seed: int
    rounds: int
    clients_per_round: int
    train: dict[str, Any]  # the client's local-training config (core.config.TrainConfig as a dict)
    num_clients: int = 0  # clients the run knows of (virtual clients; registered on a coordinator); 0: unknown


class ServerStrategy(Protocol):
    name: str
    options: Any  # its `Options`, validated from [strategy]
    settings: RunSettings
    known_probabilities: dict[str, float] | None

    def init_state(self, spec: ModelSpec) -> GlobalState: ...
    def configure(self, rnd: int, clients: list[ClientInfo], state: GlobalState) -> dict[ClientId, Task]: ...
    def upload_contract(self, state: GlobalState) -> Contract: ...
    def task_contract(self, state: GlobalState, task: Task) -> Contract: ...
    def aggregate(self, rnd: int, results: list[ClientResult], state: GlobalState) -> RoundOutcome: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, d: dict[str, Any]) -> None: ...
    # optional hooks, with their defaults in StrategyBase
    def refused(self, client_id: ClientId, metrics: dict[str, float]) -> None: ...
    def privacy_support(self) -> Support: ...
    def weighted_by_examples(self) -> bool: ...
    def client_weights(self, rnd: int, ids: list[ClientId], state: GlobalState) -> dict[ClientId, float] | None: ...
    def sums_uploads(self, state: GlobalState) -> bool: ...
    def sum_contract(self, state: GlobalState) -> Contract: ...
    def aggregate_sum(self, rnd: int, total: Tensors, weight: float, results: list[ClientResult],
                      state: GlobalState) -> RoundOutcome: ...
    def export(self, tensors: Tensors, model: torch.nn.Module) -> Exported: ...


class ClientRecipe(Protocol):
    def prepare(self, model: torch.nn.Module, task: Task) -> None: ...
    def train(self, model: torch.nn.Module, data: Any, task: Task, privacy: Any = None) -> ClientResult: ...
    def evaluate(self, model: torch.nn.Module, data: Any, task: Task) -> dict[str, float]: ...
    # optional hooks, with their defaults in RecipeBase
    def summand(self, uploads: Tensors, task: Task, weight: float) -> tuple[Tensors, float]: ...
    def dp_plan(self, dp: Any, n: int, task: Task) -> Any: ...


def sample_clients(clients: list[ClientInfo], k: int, seed: int, rnd: int) -> list[ClientInfo]:
    """k clients uniformly without replacement, a pure function of (seed, round, the client ids).

    Sorting first makes the choice independent of the order in which clients connected.
    """
    ordered = sorted(clients, key=lambda c: c.client_id)
    if k >= len(ordered):
        return ordered
    idx = permutation(derive_seed(seed, "sample", rnd), len(ordered))[:k]
    return [ordered[i] for i in sorted(idx.tolist())]


def round_lr(train: dict[str, Any], rnd: int, rounds: int) -> float:
    """Client learning rate of round `rnd` (1-based): constant, or cosine-decayed to `lr_final`."""
    lr, final = float(train["lr"]), float(train.get("lr_final", -1.0))
    if final < 0 or rounds <= 1:
        return lr
    return final + 0.5 * (lr - final) * (1 + math.cos(math.pi * (rnd - 1) / (rounds - 1)))


def train_task(settings: RunSettings, rnd: int, client: ClientId, tensors: Tensors, **extra: Any) -> Task:
    """The task that asks `client` to train from `tensors`, with its own seed for this round."""
    config = dict(settings.train, lr=round_lr(settings.train, rnd, settings.rounds),
                  seed=derive_seed(settings.seed, "train", rnd, client), **extra)
    return Task("train", rnd, config, tensors)


class RecipeBase:
    """Client-side defaults: evaluation of the prepared model, uploads summed as they are under secure
    aggregation, and DP-SGD's plan for one local run."""

    def evaluate(self, model: torch.nn.Module, data: Any, task: Task) -> dict[str, float]:
        return evaluate(model, data, int(task.config.get("batch_size", 128)))

    def summand(self, uploads: Tensors, task: Task, weight: float) -> tuple[Tensors, float]:
        """Secure aggregation: what this client adds to the masked sum, and the weight to multiply it by.
        A strategy whose upload is not itself a summand (rankings, sparse tables, seed/scalar pairs) returns
        its dense, already weighted form and 1."""
        return uploads, weight

    def dp_plan(self, dp: Any, n: int, task: Task) -> Any:
        """Client DP: the privacy.client_dp.Plan of this task's local run on n examples (what it will spend)."""
        return dp.plan_for(n, train_config(task.config))


class PerModel:
    """What a recipe keeps for each model it prepares (the simulator's virtual clients share one model, a daemon
    has its own): made on first use, dropped with the model."""

    def __init__(self, make: Callable[[torch.nn.Module], Any]):
        self._make = make
        self._of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, model: torch.nn.Module) -> Any:
        state = self._of.get(model)
        if state is None:
            state = self._of[model] = self._make(model)
        return state


@dataclass
class Weighted(Section):
    """Options of a strategy that averages by p_k = n_k / sum_j n_j ("examples") or 1/|S| ("uniform")."""

    weighting: str = option("examples", choices=("examples", "uniform"))


# What a strategy says of itself under [privacy] unless it declares otherwise: nothing is wired.
NO_PRIVACY = Support(client_dp="it does not train through DP-SGD",
                     central_dp="it uploads something the server cannot clip as an update",
                     secure_aggregation="its aggregate is not wired as a sum")


class StrategyBase:
    """Shared plumbing: options, settings, sampling and plain train tasks, and the optional hooks."""

    name: ClassVar[str]
    Options: ClassVar[type]
    Recipe: ClassVar[type]  # its client side
    privacy: ClassVar[Support] = NO_PRIVACY
    unsupported_tasks: ClassVar[dict[str, str]] = {}  # model.task -> why this strategy cannot train it
    # The simulator's oracle of each client's probability of taking part in a round (it draws availability);
    # FedAU's "known" weighting reads it. No deployment has it.
    known_probabilities: dict[str, float] | None = None

    def __init__(self, options: Any, settings: RunSettings):
        self.options = options
        self.settings = settings

    def configure(self, rnd: int, clients: list[ClientInfo], state: GlobalState) -> dict[ClientId, Task]:
        chosen = sample_clients(clients, self.settings.clients_per_round, self.settings.seed, rnd)
        return {c.client_id: train_task(self.settings, rnd, c.client_id, state.tensors) for c in chosen}

    def task_contract(self, state: GlobalState, task: Task) -> Contract:
        """What the client given `task` must send back. The same for every client unless a strategy's
        uploads vary per client (e.g. FLoRA's per-client rank, which the task states)."""
        return self.upload_contract(state)

    def state_dict(self) -> dict[str, Any]:
        return {}  # tensors of the strategy live in GlobalState.aux

    def load_state_dict(self, d: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ optional hooks
    def refused(self, client_id: ClientId, metrics: dict[str, float]) -> None:
        """The engine's report of a client that refused its task (e.g. at its privacy budget)."""

    def privacy_support(self) -> Support:
        """Which [privacy] modes this strategy, with these options, can run under (and why not)."""
        return self.privacy

    def weighted_by_examples(self) -> bool:
        """Whether the aggregate weights each client by its number of examples (else all alike)."""
        return isinstance(self.options, Weighted) and self.options.weighting == "examples"

    def client_weights(self, rnd: int, ids: list[ClientId], state: GlobalState) -> dict[ClientId, float] | None:
        """Secure aggregation: weights the server computes and each client applies to its own upload (FedAU's
        participation weights); None: clients weigh by examples or uniformly, as `weighted_by_examples`."""
        return None

    def sums_uploads(self, state: GlobalState) -> bool:
        """Whether the next round's aggregate is the plain sum of the uploads rather than a weighted mean
        (Fed-SB's initialisation); privacy then sums instead of averaging."""
        return False

    def sum_contract(self, state: GlobalState) -> Contract:
        """Secure aggregation: the shapes and dtypes of a client's summand, before masking."""
        return self.upload_contract(state)

    def export(self, tensors: Tensors, model: torch.nn.Module) -> Exported:
        """The global tensors of this strategy as LoRA factors, base changes and other parameters. By default they
        are the model's trainable parameters themselves: peft LoRA factors (their scaling read from `model`, the
        run's model as built) and the rest (a head), or, without LoRA, every parameter (full fine-tuning)."""
        layers = lora_layers(model, required=False)
        if not layers:
            return Exported(params=dict(tensors), full=True)
        factors: dict[str, dict[str, torch.Tensor]] = {}
        params = {}
        for name, t in tensors.items():
            m = LORA_FACTOR.match(name)
            if m:
                factors.setdefault(m["module"], {})[m["factor"]] = t
            else:
                params[name] = t
        return Exported({mod: (f["A"], f["B"], float(layers[mod].scaling["default"])) for mod, f in factors.items()},
                        params=params)

    def aggregate_sum(self, rnd: int, total: Tensors, weight: float, results: list[ClientResult],
                      state: GlobalState) -> RoundOutcome:
        """The round from the unmasked sum_k w_k x_k (`total`, fp64) and sum_k w_k alone. By default every
        result carries the weighted mean, which the strategy's own weighted average turns back into it (in a
        summing round the first carries the sum, the others zeros)."""
        dtypes = {k: s.dtype for k, s in self.upload_contract(state).items()}
        if self.sums_uploads(state):
            first = {k: v.to(dtypes[k]) for k, v in total.items()}
            zeros = {k: torch.zeros_like(v, dtype=dtypes[k]) for k, v in total.items()}
            carried = [first if i == 0 else zeros for i in range(len(results))]
        else:
            mean = {k: (v / weight).to(dtypes[k]) for k, v in total.items()}
            carried = [mean] * len(results)
        return self.aggregate(rnd, [ClientResult(r.client_id, r.num_examples, t, r.metrics)
                                    for r, t in zip(results, carried)], state)
