"""The two protocols every strategy implements, the shared message types, and the registry.

Server sides are pure (tensors in, tensors out, no I/O) so they can be tested with tiny fp64 tensors
and driven by any transport: the in-process simulator or the gRPC coordinator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from fedadapt.core.codec import Contract
from fedadapt.core.config import from_dict
from fedadapt.core.errors import ConfigError
from fedadapt.core.rng import derive_seed, permutation

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


class ServerStrategy(Protocol):
    name: str

    def init_state(self, spec: ModelSpec) -> GlobalState: ...
    def configure(self, rnd: int, clients: list[ClientInfo], state: GlobalState) -> dict[ClientId, Task]: ...
    def upload_contract(self, state: GlobalState) -> Contract: ...
    def task_contract(self, state: GlobalState, task: Task) -> Contract: ...
    def aggregate(self, rnd: int, results: list[ClientResult], state: GlobalState) -> RoundOutcome: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, d: dict[str, Any]) -> None: ...


class ClientRecipe(Protocol):
    def prepare(self, model: torch.nn.Module, task: Task) -> None: ...
    def train(self, model: torch.nn.Module, data: Any, task: Task, privacy: Any = None) -> ClientResult: ...
    def evaluate(self, model: torch.nn.Module, data: Any, task: Task) -> dict[str, float]: ...


@dataclass
class RunSettings:
    """What every server strategy needs besides its own options."""

    seed: int
    rounds: int
    clients_per_round: int
    train: dict[str, Any]  # the client's local-training config (core.config.TrainConfig as a dict)
    num_clients: int = 0  # clients the run knows of (virtual clients; registered on a coordinator); 0: unknown


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


_REGISTRY: dict[str, tuple[type, type]] = {}


def register(name: str, recipe: type):
    """Class decorator: make a server strategy and its client recipe selectable by `name`."""

    def wrap(cls: type) -> type:
        cls.name = name
        _REGISTRY[name] = (cls, recipe)
        return cls

    return wrap


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def build(strategy_cfg: dict[str, Any], settings: RunSettings) -> tuple[ServerStrategy, ClientRecipe]:
    """Instantiate the strategy named in `[strategy]`, validating its options by their dotted names."""
    _load_builtin()
    options = dict(strategy_cfg)
    name = options.pop("name", None)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown strategy {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    server_cls, recipe_cls = _REGISTRY[name]
    opts = from_dict(server_cls.Options, options, "strategy.")
    return server_cls(opts, settings), recipe_cls()


def recipe_for(name: str) -> ClientRecipe:
    """The client side of strategy `name` (what a client daemon runs; no server options needed)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown strategy {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name][1]()


def _load_builtin() -> None:
    from . import fedavg  # noqa: F401  (registers itself)
    from . import frl, median  # noqa: F401
    from . import fedsb, flora, zeropad  # noqa: F401
    from . import fedau  # noqa: F401
    from . import ferret, zo  # noqa: F401


class StrategyBase:
    """Shared plumbing: options, settings, sampling and plain train tasks."""

    name: ClassVar[str]
    Options: ClassVar[type]

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
