"""Run configuration: a TOML file -> validated dataclasses, with `--set key=value` overrides.

Unknown keys are errors that name the key (and the closest valid one), because a typo'd key that is
silently ignored runs the wrong experiment. Strategy-specific options live under `[strategy]` and
are validated by the chosen strategy with the same `from_dict`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


class Section:
    """A config table. Each field's own allowed values are declared with `option` and checked by `from_dict`;
    rules between fields go in `check`, which `from_dict` calls last."""

    def check(self) -> None:
        """Cross-field rules; raise ConfigError with one line that names the keys."""


def option(default: Any, *, choices: tuple = (), gt: float | None = None, ge: float | None = None,
           lt: float | None = None, le: float | None = None) -> Any:
    """A field whose value must be one of `choices`, or within the bounds (for a list: every item)."""
    meta = {"choices": choices, "gt": gt, "ge": ge, "lt": lt, "le": le}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig(Section):
    source: str = "minilm"  # "minilm" (packaged all-MiniLM-L6-v2), "tiny-llama", "mlp", or a HF model directory
    task: str = option("classification", choices=("classification", "causal-lm"))  # causal-lm: source is a
    # causal LM folder (with its tokenizer) fine-tuned on chat data (data.dataset: .jsonl file or folder)
    max_length: int = option(64, gt=0)  # tokens per example (causal-lm: per conversation, prompt + response)
    hidden: list[int] = option([64], gt=0)  # hidden sizes of the "mlp" model
    device: str = option("auto", choices=("auto", "cpu", "cuda", "mps"))  # where clients train (and the server
    # evaluates); auto: CUDA, else MPS, else CPU. Aggregation and the wire are fp32 on the CPU whatever this is
    dtype: str = option("fp32", choices=("fp32", "bf16", "fp16"))  # the frozen base's precision (adapters: fp32)
    quantize: str = option("none", choices=("none", "4bit", "8bit"))  # a bitsandbytes base (QLoRA), CUDA only


@dataclass
class AdapterConfig(Section):
    kind: str = option("lora", choices=("lora", "full", "supermask"))  # "lora": LoRA on target_modules + task
    # head; "full": every parameter; "supermask": frozen random weights whose edges are masked by trained scores
    # (FRL) -- every layer of an mlp, or frozen random LoRA factors (rank > 0) and the head of a text model
    rank: int = 8
    alpha: float = 16.0
    dropout: float = option(0.0, ge=0, lt=1)
    target_modules: list[str] = option([])  # empty: what peft uses for the architecture (BERT/MiniLM: query,
    # value; Llama, Qwen2, Mistral: q_proj, v_proj; GPT-2: c_attn), else q_proj/v_proj, else every linear layer
    keep: float = option(0.5, gt=0, le=1)  # supermask: fraction of each layer's edges the mask keeps (k)

    def check(self) -> None:
        if self.kind == "lora" and self.rank <= 0:
            raise ConfigError(f"config key 'adapter.rank' must be positive, got {self.rank}")
        if self.kind == "supermask" and self.rank < 0:
            raise ConfigError(f"config key 'adapter.rank' must be >= 0 (0: supermask the head only), got {self.rank}")


@dataclass
class DataConfig(Section):
    dataset: str = "shakespeare-genre"  # shakespeare-genre | digits | mnist1d | synthetic | path to .jsonl/.csv
    partition: str = option("natural", choices=("natural", "iid", "dirichlet"))
    num_clients: int = option(0, ge=0)  # 0: one client per natural group (natural) — required for iid/dirichlet
    alpha: float = option(0.5, gt=0)  # Dirichlet concentration
    min_examples: int = option(1, ge=0)  # smallest client the partitioner may produce
    test_fraction: float = option(0.2, gt=0, lt=1)
    snippet_lines: int = option(4, gt=0)  # shakespeare-genre: lines per example
    min_lines: int = option(100, ge=0)  # shakespeare-genre: smallest speaking role kept
    num_examples: int = option(640, gt=0)  # synthetic: total examples
    text_field: str = "text"  # user files
    label_field: str = "label"
    group_field: str = ""


OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass
class TrainConfig(Section):
    """Local training on each client."""

    optimizer: str = option("sgd", choices=OPTIMIZERS)
    lr: float = option(0.1, gt=0)
    lr_final: float = -1.0  # < 0: constant lr; else cosine-decayed to this over the rounds
    momentum: float = option(0.0, ge=0)
    weight_decay: float = option(0.0, ge=0)
    local_steps: int = option(1, ge=0)
    local_epochs: int = option(0, ge=0)  # > 0 replaces local_steps by whole passes over the client's data
    batch_size: int = option(32, gt=0)
    max_grad_norm: float = option(0.0, ge=0)  # 0 disables clipping
    grad_accum_steps: int = option(1, gt=0)  # micro-batches (of batch_size) per optimizer step
    gradient_checkpointing: bool = False  # causal-lm: recompute activations in the backward pass (less memory)

    def check(self) -> None:
        if self.local_steps <= 0 and self.local_epochs <= 0:
            raise ConfigError("one of 'train.local_steps' or 'train.local_epochs' must be positive")


@dataclass
class EvalConfig(Section):
    every: int = option(1, gt=0)  # evaluate the global model every N rounds (and always after the last)
    max_examples: int = option(256, gt=0)  # fixed seeded subset for per-round evaluation; the final one uses all
    batch_size: int = option(128, gt=0)
    final_max_examples: int = option(0, ge=0)  # cap per held-out set for the final evaluation (seeded); 0: all
    generate: int = option(32, ge=0)  # causal-lm: held-out prompts answered greedily at the end (ROUGE-L, exact
    # match; written to generations.jsonl)
    max_new_tokens: int = option(48, gt=0)  # causal-lm: longest generated answer


@dataclass
class CoordinatorConfig(Section):
    """How a round waits for clients (deployments and `simulate --transport grpc`)."""

    min_clients: int = option(0, ge=0)  # connected clients needed before a round starts; 0: min_results
    min_results: int = option(1, gt=0)  # valid results needed to aggregate; fewer leaves the global state unchanged
    round_timeout: float = option(0.0, ge=0)  # seconds a round waits for results once sent; 0: until every asked
    # client answered or left
    join_timeout: float = option(0.0, ge=0)  # seconds to wait for min_clients before a round fails; 0: forever


ATTACK_KINDS = ("none", "label-flip", "sign-flip", "scale", "random", "reverse-ranking")


@dataclass
class AttackConfig(Section):
    """Simulated malicious clients (simulation/attacks.py); chosen from the seed, the same every round."""

    kind: str = option("none", choices=ATTACK_KINDS)  # none | label-flip | sign-flip | scale | random |
    # reverse-ranking
    fraction: float = option(0.0, ge=0, le=1)  # share of all clients that are malicious
    scale: float = option(1.0, ge=0)  # sign-flip: send -scale x the honest update; scale: scale x; random: noise std


@dataclass
class AvailabilityConfig(Section):
    """Which virtual clients answer in each round (simulation/availability.py). Client n is available a
    long-run fraction p_n of the rounds; the strategies never see p_n (except FedAU's "known" oracle)."""

    pattern: str = option("always", choices=("always", "bernoulli", "markov", "cyclic"))  # always | bernoulli
    # (each round independently) | markov (on/off chain) | cyclic
    probabilities: str = option("labels", choices=("labels", "dirichlet", "uniform"))  # how p_n is drawn:
    # labels (class-wise Dirichlet weights mixed by the client's label mix, as FedAU's paper) | dirichlet (per
    # client) | uniform (every p_n = mean)
    mean: float = option(0.1, gt=0, le=1)  # average p_n before the floor
    floor: float = option(0.02, gt=0, le=1)  # smallest p_n
    alpha: float = option(0.1, gt=0)  # Dirichlet concentration for `probabilities`
    markov_rate: float = option(0.05, gt=0, le=1)  # markov: largest probability of turning available per round
    period: int = option(100, ge=2)  # cyclic: rounds per cycle; a client is available for about p_n * period
    absent: str = option("silent", choices=("silent", "offline"))  # an unavailable client: silent (gets its
    # task, never answers) | offline (not connected: the strategy samples among the available clients only, as
    # a coordinator among connected ones)


@dataclass
class PrivacyConfig(Section):
    """Differential privacy and secure aggregation (fedadapt/privacy). Cross-section rules (which strategy
    allows what) are checked with the strategy (runtime/setup.py); only the section's own ranges here."""

    dp: str = option("none", choices=("none", "client", "central"))  # none | client (DP-SGD on each client,
    # opacus) | central (server clips updates, adds noise)
    epsilon: float = option(0.0, ge=0)  # the budget: per client (dp = client) or for the run (dp = central)
    delta: float = option(1e-5, gt=0, lt=1)  # keep it below 1 / (examples of the smallest client)
    noise_multiplier: float = -1.0  # < 0: calibrated so that `planned_rounds` rounds spend `epsilon`
    max_grad_norm: float = option(1.0, gt=0)  # client: per-example clip; central: per-client update clip
    # (inf: no clipping)
    planned_rounds: int = option(0, ge=0)  # rounds the calibration plans for (client DP: a client's
    # participations); 0: all
    accountant: str = option("rdp", choices=("rdp", "prv"))  # opacus accountants
    secure_aggregation: bool = False  # pairwise-masked uploads: the server learns only their sum
    secagg_frac_bits: int = option(24, ge=8, le=40)  # fixed-point fraction bits of masked values


@dataclass
class RunConfig(Section):
    name: str = "run"
    seed: int = 0
    rounds: int = option(10, gt=0)
    clients_per_round: int = option(10, gt=0)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    availability: AvailabilityConfig = field(default_factory=AvailabilityConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    strategy: dict[str, Any] = field(default_factory=lambda: {"name": "fedavg"})  # validated by the strategy

    def check(self) -> None:
        if not isinstance(self.strategy.get("name"), str):
            raise ConfigError("config key 'strategy.name' must be given as a string")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SCENARIOS = Path(__file__).resolve().parents[2] / "simulations"  # the bundled scenarios, in a checkout


def scenario_path(path: str | Path) -> Path:
    """A scenario file: `path` itself, or a bundled scenario by name (`quickstart`, `chat-tiny.toml`), so that
    `fedadapt simulate quickstart` works from any directory. One line when it is neither."""
    p = Path(path)
    if p.is_file():
        return p
    bundled = SCENARIOS / (p.name if p.suffix == ".toml" else p.name + ".toml")
    if len(p.parts) == 1 and bundled.is_file():
        return bundled
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a folder; give a scenario .toml file")
    names = ", ".join(sorted(f.stem for f in SCENARIOS.glob("*.toml")))
    raise ConfigError(f"config file {str(p)!r} does not exist" + (f" (bundled scenarios: {names})" if names else ""))


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a TOML file or bundled scenario (or start from defaults if None), apply `key=value` overrides,
    validate."""
    text = ""
    if path is not None:
        text = scenario_path(path).read_text()
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
    return from_dict(RunConfig, raw)


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


T = typing.TypeVar("T", bound=Section)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build section `cls` from `data`: unknown keys, wrong types and values outside a field's `option` are
    refused by their dotted name (with the closest valid key for a typo), then `check` runs."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else f" (valid keys: {', '.join(fields)})"
            raise ConfigError(f"unknown config key {prefix + key!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, prefix + key)
        _allowed(fields[key].metadata, kwargs[key], prefix + key)
    section = cls(**kwargs)
    section.check()
    return section


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _allowed(meta: Mapping[str, Any], value: Any, name: str) -> None:
    """The `option` declaration of a field, applied to its (coerced) value."""
    if not meta:
        return
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"config key {name!r} must be one of {', '.join(meta['choices'])}; got {value!r}")
    gt, ge, lt, le = meta["gt"], meta["ge"], meta["lt"], meta["le"]
    for v in value if isinstance(value, list) else [value]:
        if (gt is not None and not v > gt) or (ge is not None and not v >= ge) or \
                (lt is not None and not v < lt) or (le is not None and not v <= le):
            what = f" (every item of {value})" if isinstance(value, list) else ""
            raise ConfigError(f"config key {name!r} must be {_bounds(gt, ge, lt, le)}, got {v!r}{what}")


def _bounds(gt, ge, lt, le) -> str:
    if (gt, ge, lt, le) == (0, None, None, None):
        return "positive"
    if lt is None and le is None:
        return f"> {gt:g}" if gt is not None else f">= {ge:g}"
    if gt is None and ge is None:
        return f"< {lt:g}" if lt is not None else f"<= {le:g}"
    low = f"({gt:g}" if gt is not None else f"[{ge:g}"
    return f"in {low}, " + (f"{lt:g})" if lt is not None else f"{le:g}]")


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
