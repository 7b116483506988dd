"""Config-time compatibility check: unsafe or meaningless privacy combinations fail before a run starts,
with a message saying why. Each strategy declares what it supports (`Support`); runtime/setup.py passes
that declaration here when a run is simulated or submitted to a coordinator."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from fedadapt.core.config import RunConfig
from fedadapt.core.errors import ConfigError


@dataclass(frozen=True)
class Support:
    """What a strategy can run under [privacy]: None where it can, else the one-line reason why not."""

    client_dp: str | None = None  # its recipe trains through the `privacy` hook (DP-SGD)
    central_dp: str | None = None  # the server may clip and noise its uploads as model updates (or sums)
    secure_aggregation: str | None = None  # its aggregate is computed from a (weighted) sum of the uploads

    def but(self, **why: str | None) -> Support:
        """This declaration with some fields changed."""
        return dataclasses.replace(self, **why)


def check(cfg: RunConfig, support: Support) -> None:
    """Raise ConfigError for a privacy setting that cannot work with the rest of `cfg` and its strategy."""
    p, name = cfg.privacy, cfg.strategy.get("name")
    if p.dp != "none":
        if not (p.epsilon > 0 and math.isfinite(p.epsilon)):
            raise ConfigError(f"privacy.dp = {p.dp!r} needs a finite budget privacy.epsilon > 0 (got {p.epsilon}): "
                              "DP without a budget protects nothing")
        if p.noise_multiplier == 0:
            raise ConfigError("privacy.noise_multiplier = 0 adds no noise (epsilon is infinite): set privacy.dp = "
                              "'none', or a noise multiplier > 0 (or < 0 to calibrate it from privacy.epsilon)")
        if not math.isfinite(p.max_grad_norm):
            raise ConfigError("privacy.max_grad_norm = inf leaves sensitivity unbounded (the noise scales with it): "
                              "give a finite clip")
    if p.dp == "client" and support.client_dp:
        raise ConfigError(f"privacy.dp = 'client' cannot be used with strategy {name!r}: {support.client_dp}")
    if p.dp == "central" and support.central_dp:
        raise ConfigError(f"privacy.dp = 'central' cannot be used with strategy {name!r}: {support.central_dp}")
    if p.secure_aggregation:
        if support.secure_aggregation:
            raise ConfigError(f"privacy.secure_aggregation cannot be used with strategy {name!r}: "
                              f"{support.secure_aggregation}")
        if p.dp == "central":
            raise ConfigError("privacy.dp = 'central' clips each client's update on the server, which secure "
                              "aggregation hides: use privacy.dp = 'client' with secure aggregation")
        if cfg.availability.pattern != "always" and cfg.availability.absent == "silent":
            raise ConfigError("availability.absent = 'silent' makes every round's unavailable clients silent "
                              "participants, whose masks stay in the others' uploads: secure aggregation would "
                              "discard every such round; set availability.absent = 'offline'")
        if cfg.attack.kind != "none" and cfg.attack.fraction > 0:
            raise ConfigError("[attack] rewrites clear uploads; with privacy.secure_aggregation uploads are masked "
                              "and a rewritten one only corrupts the sum: remove one of them")
