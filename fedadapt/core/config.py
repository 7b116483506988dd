"""Run configuration: a TOML file -> validated dataclasses, with `--set key=value` overrides.

Unknown keys are errors that name the key (and the closest valid one), because a typo'd key that is
silently ignored runs the wrong experiment. Strategy-specific options live under `[strategy]` and
are validated by the chosen strategy with the same `from_dict`.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass
class ModelConfig:
    source: str = "minilm"  # "minilm" (packaged all-MiniLM-L6-v2), "tiny-llama", "mlp", or a HF model directory
    max_length: int = 64  # tokens per text example
    hidden: list[int] = field(default_factory=lambda: [64])  # hidden sizes of the "mlp" model


@dataclass
class AdapterConfig:
    kind: str = "lora"  # "lora": LoRA on target_modules + task head; "full": every parameter;
    # "supermask": frozen random weights whose edges are masked by trained scores (FRL) -- every layer of
    # an mlp, or frozen random LoRA factors (rank > 0) and the head of a text model
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    keep: float = 0.5  # supermask: fraction of each layer's edges the mask keeps (k)


@dataclass
class DataConfig:
    dataset: str = "shakespeare-genre"  # shakespeare-genre | digits | mnist1d | synthetic | path to .jsonl/.csv
    partition: str = "natural"  # natural | iid | dirichlet
    num_clients: int = 0  # 0: one client per natural group (natural) — required for iid/dirichlet
    alpha: float = 0.5  # Dirichlet concentration
    min_examples: int = 1  # smallest client the partitioner may produce
    test_fraction: float = 0.2
    snippet_lines: int = 4  # shakespeare-genre: lines per example
    min_lines: int = 100  # shakespeare-genre: smallest speaking role kept
    num_examples: int = 640  # synthetic: total examples
    text_field: str = "text"  # user files
    label_field: str = "label"
    group_field: str = ""


@dataclass
class TrainConfig:
    """Local training on each client."""

    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1
    lr_final: float = -1.0  # < 0: constant lr; else cosine-decayed to this over the rounds
    momentum: float = 0.0
    weight_decay: float = 0.0
    local_steps: int = 1
    local_epochs: int = 0  # > 0 replaces local_steps by whole passes over the client's data
    batch_size: int = 32
    max_grad_norm: float = 0.0  # 0 disables clipping


@dataclass
class EvalConfig:
    every: int = 1  # evaluate the global model every N rounds (and always after the last)
    max_examples: int = 256  # fixed seeded subset for per-round evaluation; the final one uses all
    batch_size: int = 128
    final_max_examples: int = 0  # cap per held-out set for the final evaluation (seeded subset); 0: all


@dataclass
class CoordinatorConfig:
    """How a round waits for clients (deployments and `simulate --transport grpc`)."""

    min_clients: int = 0  # connected clients needed before a round starts; 0: min_results
    min_results: int = 1  # valid results needed to aggregate; fewer leaves the global state unchanged
    round_timeout: float = 0.0  # seconds a round waits for results once sent; 0: until every asked client answered or left
    join_timeout: float = 0.0  # seconds to wait for min_clients before a round fails; 0: wait indefinitely


@dataclass
class AttackConfig:
    """Simulated malicious clients (simulation/attacks.py); chosen from the seed, the same every round."""

    kind: str = "none"  # none | label-flip | sign-flip | scale | random | reverse-ranking
    fraction: float = 0.0  # share of all clients that are malicious
    scale: float = 1.0  # sign-flip: send -scale x the honest update; scale: scale x; random: noise std


ATTACK_KINDS = ("none", "label-flip", "sign-flip", "scale", "random", "reverse-ranking")


AVAILABILITY_PATTERNS = ("always", "bernoulli", "markov", "cyclic")
AVAILABILITY_PROBABILITIES = ("labels", "dirichlet", "uniform")
AVAILABILITY_ABSENCES = ("silent", "offline")


@dataclass
class AvailabilityConfig:
    """Which virtual clients answer in each round (simulation/availability.py). Client n is available a
    long-run fraction p_n of the rounds; the strategies never see p_n (except FedAU's "known" oracle)."""

    pattern: str = "always"  # always | bernoulli (each round independently) | markov (on/off chain) | cyclic
    probabilities: str = "labels"  # how p_n is drawn: labels (class-wise Dirichlet weights mixed by the
    # client's label mix, as FedAU's paper) | dirichlet (per client) | uniform (every p_n = mean)
    mean: float = 0.1  # average p_n before the floor
    floor: float = 0.02  # smallest p_n
    alpha: float = 0.1  # Dirichlet concentration for `probabilities`
    markov_rate: float = 0.05  # markov: largest probability of turning available from one round to the next
    period: int = 100  # cyclic: rounds per cycle; a client is available for a block of about p_n * period
    absent: str = "silent"  # an unavailable client: silent (gets its task, never answers) | offline (not
    # connected: the strategy samples among the available clients only, as a coordinator among connected ones)

    def __post_init__(self) -> None:
        for key, value, allowed in (("pattern", self.pattern, AVAILABILITY_PATTERNS),
                                    ("probabilities", self.probabilities, AVAILABILITY_PROBABILITIES),
                                    ("absent", self.absent, AVAILABILITY_ABSENCES)):
            if value not in allowed:
                raise ConfigError(f"config key 'availability.{key}' must be one of {', '.join(allowed)}; got {value!r}")
        for key, value in (("mean", self.mean), ("floor", self.floor), ("markov_rate", self.markov_rate)):
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"config key 'availability.{key}' must be in (0, 1], got {value}")
        if not self.alpha > 0 or self.period < 2:
            raise ConfigError("config keys 'availability.alpha' must be > 0 and 'availability.period' >= 2")


DP_MODES = ("none", "client", "central")


@dataclass
class PrivacyConfig:
    """Differential privacy and secure aggregation (fedadapt/privacy). Cross-section rules (which strategy
    allows what) live in privacy/compat.py; only the section's own ranges are checked here."""

    dp: str = "none"  # none | client (DP-SGD on each client, opacus) | central (server clips updates, adds noise)
    epsilon: float = 0.0  # the budget: per client (dp = client) or for the run (dp = central); required with DP
    delta: float = 1e-5  # keep it below 1 / (examples of the smallest client)
    noise_multiplier: float = -1.0  # < 0: calibrated so that `planned_rounds` rounds spend `epsilon`
    max_grad_norm: float = 1.0  # client: per-example clip; central: per-client update clip (inf: no clipping)
    planned_rounds: int = 0  # rounds the calibration plans for (client DP: a client's participations); 0: all
    accountant: str = "rdp"  # rdp | prv (opacus accountants)
    secure_aggregation: bool = False  # pairwise-masked uploads: the server learns only their sum
    secagg_frac_bits: int = 24  # fixed-point fraction bits of masked values

    def __post_init__(self) -> None:
        if self.dp not in DP_MODES:
            raise ConfigError(f"config key 'privacy.dp' must be one of {', '.join(DP_MODES)}; got {self.dp!r}")
        if self.accountant not in ("rdp", "prv"):
            raise ConfigError(f"config key 'privacy.accountant' must be 'rdp' or 'prv'; got {self.accountant!r}")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"config key 'privacy.delta' must be in (0, 1), got {self.delta}")
        if self.epsilon < 0 or not self.max_grad_norm > 0 or self.planned_rounds < 0:
            raise ConfigError("config keys 'privacy.epsilon' and 'privacy.planned_rounds' must be >= 0 and "
                              "'privacy.max_grad_norm' > 0")
        if not 8 <= self.secagg_frac_bits <= 40:
            raise ConfigError(f"config key 'privacy.secagg_frac_bits' must be in [8, 40], got {self.secagg_frac_bits}")


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    rounds: int = 10
    clients_per_round: int = 10
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    availability: AvailabilityConfig = field(default_factory=AvailabilityConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    strategy: dict[str, Any] = field(default_factory=lambda: {"name": "fedavg"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a TOML file (or start from defaults if None), apply `key=value` overrides, validate."""
    text = ""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        text = p.read_text()
    return load_config_text(text, overrides, source=str(path))


def load_config_text(text: str, overrides: list[str] = (), source: str = "config") -> RunConfig:
    """`load_config` for TOML text (a run submitted to a coordinator)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    for item in overrides:
        apply_override(raw, item)
    if isinstance(raw.get("strategy"), dict):
        raw["strategy"].setdefault("name", "fedavg")
    cfg = from_dict(RunConfig, raw)
    check_values(cfg)
    return cfg


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`a.b=value`: value parsed as a TOML literal (so 3, 0.1, true, ["q","v"]), else a plain string."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a table")
    node[parts[-1]] = value


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types by their dotted name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else f" (valid keys: {', '.join(names)})"
            raise ConfigError(f"unknown config key {prefix + key!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, name + ".")
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key {name!r} must be a list, got {value!r}")
        return [_coerce(item_tp, v, name) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {name!r} must be a table, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported union type for {name}")  # the schema avoids unions
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"config key {name!r} must be {tp.__name__}, got {value!r}")
    return value


def check_values(cfg: RunConfig) -> None:
    """Range checks that types alone do not catch."""
    positive = {
        "rounds": cfg.rounds,
        "clients_per_round": cfg.clients_per_round,
        "model.max_length": cfg.model.max_length,
        "train.batch_size": cfg.train.batch_size,
        "eval.every": cfg.eval.every,
        "eval.max_examples": cfg.eval.max_examples,
        "eval.batch_size": cfg.eval.batch_size,
        "coordinator.min_results": cfg.coordinator.min_results,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key {key!r} must be positive, got {value}")
    if cfg.train.local_steps <= 0 and cfg.train.local_epochs <= 0:
        raise ConfigError("one of 'train.local_steps' or 'train.local_epochs' must be positive")
    if cfg.train.lr <= 0:
        raise ConfigError(f"config key 'train.lr' must be positive, got {cfg.train.lr}")
    choices = {
        "adapter.kind": (cfg.adapter.kind, ("lora", "full", "supermask")),
        "attack.kind": (cfg.attack.kind, ATTACK_KINDS),
        "data.partition": (cfg.data.partition, ("natural", "iid", "dirichlet")),
        "train.optimizer": (cfg.train.optimizer, ("sgd", "adam", "adamw")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(allowed)}; got {value!r}")
    if cfg.adapter.kind == "lora" and cfg.adapter.rank <= 0:
        raise ConfigError(f"config key 'adapter.rank' must be positive, got {cfg.adapter.rank}")
    if cfg.adapter.kind == "supermask" and cfg.adapter.rank < 0:
        raise ConfigError(f"config key 'adapter.rank' must be >= 0 (0: supermask the head only), "
                          f"got {cfg.adapter.rank}")
    if not 0.0 < cfg.adapter.keep <= 1.0:
        raise ConfigError(f"config key 'adapter.keep' must be in (0, 1], got {cfg.adapter.keep}")
    if not 0.0 <= cfg.attack.fraction <= 1.0:
        raise ConfigError(f"config key 'attack.fraction' must be in [0, 1], got {cfg.attack.fraction}")
    if cfg.attack.scale < 0:
        raise ConfigError(f"config key 'attack.scale' must be >= 0, got {cfg.attack.scale}")
    if not 0.0 < cfg.data.test_fraction < 1.0:
        raise ConfigError(f"config key 'data.test_fraction' must be in (0, 1), got {cfg.data.test_fraction}")
    c = cfg.coordinator
    if c.min_clients < 0 or c.round_timeout < 0 or c.join_timeout < 0:
        raise ConfigError("config keys 'coordinator.min_clients', 'coordinator.round_timeout' and "
                          "'coordinator.join_timeout' must be >= 0")
    if not isinstance(cfg.strategy.get("name"), str):
        raise ConfigError("config key 'strategy.name' must be given as a string")
