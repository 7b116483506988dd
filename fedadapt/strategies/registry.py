"""Strategy name -> class, imported only when asked for.

A strategy is one module with a `StrategyBase` subclass that names its `Options` and client `Recipe`;
adding one is that module plus a line in `BUILTIN`. Packages outside fedadapt add theirs through the entry
point group `fedadapt.strategies` (name = "package.module:Class"), e.g. in their pyproject.toml:

    [project.entry-points."fedadapt.strategies"]
    mystrategy = "mypackage.strategy:MyStrategy"
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from fedadapt.core.config import from_dict
from fedadapt.core.errors import ConfigError

from .base import ClientRecipe, RunSettings, ServerStrategy, StrategyBase

BUILTIN = {
    "fedavg": "fedadapt.strategies.fedavg:FedAvg",
    "median": "fedadapt.strategies.median:Median",
    "fedau": "fedadapt.strategies.fedau:FedAU",
    "flora": "fedadapt.strategies.flora:Flora",
    "zeropad": "fedadapt.strategies.zeropad:ZeroPad",
    "fedsb": "fedadapt.strategies.fedsb:FedSB",
    "frl": "fedadapt.strategies.frl:FRL",
    "ferret": "fedadapt.strategies.ferret:Ferret",
    "zo": "fedadapt.strategies.zo:ZO",
    "fedex-lora": "fedadapt.strategies.fedex:FedEx",
    "ffa-lora": "fedadapt.strategies.ffa:FFA",
    "flexlora": "fedadapt.strategies.flexlora:FlexLoRA",
}


@cache
def _table() -> dict[str, str]:
    plugins = {ep.name: ep.value for ep in entry_points(group="fedadapt.strategies")}
    return {**plugins, **BUILTIN}  # a plugin cannot shadow a built-in name


def available() -> list[str]:
    return sorted(_table())


def strategy_class(name: Any) -> type[StrategyBase]:
    """The server class of strategy `name` (its module is imported now)."""
    target = _table().get(name) if isinstance(name, str) else None
    if target is None:
        raise ConfigError(f"unknown strategy {name!r}; available: {', '.join(available())}")
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if getattr(cls, "name", None) != name:
        raise ConfigError(f"strategy {name!r} resolves to {target}, whose name is {getattr(cls, 'name', None)!r}")
    return cls


def build(strategy_cfg: dict[str, Any], settings: RunSettings) -> tuple[ServerStrategy, ClientRecipe]:
    """Instantiate the strategy named in `[strategy]`, validating its options by their dotted names."""
    options = dict(strategy_cfg)
    cls = strategy_class(options.pop("name", None))
    return cls(from_dict(cls.Options, options, "strategy."), settings), cls.Recipe()


def recipe_for(name: str) -> ClientRecipe:
    """The client side of strategy `name` (what a client daemon runs; no server options needed)."""
    return strategy_class(name).Recipe()
