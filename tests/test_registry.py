"""strategies/registry.py: strategies are found by name and imported only when asked for; each declares its
options, recipe and what it supports under [privacy]."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedadapt.core.errors import ConfigError
from fedadapt.privacy.compat import Support
from fedadapt.strategies.base import RecipeBase, RunSettings, StrategyBase
from fedadapt.strategies.registry import BUILTIN, available, build, recipe_for, strategy_class


def test_base_and_registry_import_no_strategy_until_one_is_asked_for():
    code = ("import json, sys, fedadapt.strategies.base, fedadapt.strategies.registry as r\n"
            "mods = lambda: json.dumps(sorted(m for m in sys.modules if m.startswith('fedadapt.strategies.')))\n"
            "print(mods()); r.strategy_class('zo'); print(mods())\n")
    before, after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                   check=True).stdout.splitlines()
    strategies = {f"fedadapt.strategies.{n}" for n in BUILTIN}
    assert not strategies & set(json.loads(before))
    assert strategies & set(json.loads(after)) == {"fedadapt.strategies.zo"}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_builtin_declares_its_name_options_recipe_and_privacy(name):
    cls = strategy_class(name)
    assert issubclass(cls, StrategyBase) and cls.name == name
    assert isinstance(cls.privacy, Support) and issubclass(cls.Recipe, RecipeBase)
    server, recipe = build({"name": name}, RunSettings(0, 2, 2, {"lr": 0.1}))  # the defaults work
    assert type(recipe) is cls.Recipe and type(recipe_for(name)) is cls.Recipe
    assert isinstance(server.privacy_support(), Support)


def test_unknown_names_and_options_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown strategy 'fedavgg'; available: " + ", ".join(available())):
        build({"name": "fedavgg"}, RunSettings(0, 1, 1, {"lr": 0.1}))
    with pytest.raises(ConfigError, match="unknown config key 'strategy.server_lrr' .did you mean 'strategy.server_lr'"):
        build({"name": "fedavg", "server_lrr": 1.0}, RunSettings(0, 1, 1, {"lr": 0.1}))
    with pytest.raises(ConfigError, match="'strategy.server_momentum' must be in .0, 1., got 1.0"):
        build({"name": "fedavg", "server_momentum": 1.0}, RunSettings(0, 1, 1, {"lr": 0.1}))
