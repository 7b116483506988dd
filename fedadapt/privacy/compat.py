"""Config-time compatibility check: unsafe or meaningless privacy combinations fail before a run starts,
with a message saying why. Called by `fedadapt simulate` and by a coordinator when a run is submitted."""

from __future__ import annotations

import math

from fedadapt.core.config import RunConfig
from fedadapt.core.errors import ConfigError

# Strategies whose client recipe trains through the `privacy` hook (FedAU reuses FedAvg's recipe; Ferret
# projects a first-order update, FRL ranks its scores: both post-process what DP-SGD trained).
CLIENT_DP = ("fedavg", "fedau", "fedsb", "ferret", "frl")
# Strategies whose uploads the server may clip and noise as model updates (or, in Fed-SB's init, sums).
CENTRAL_DP = ("fedavg", "fedsb")
# Why the others do not take central DP.
NO_CENTRAL_DP = {
    "fedau": "FedAU multiplies a client's update by its participation weight (up to the cutoff K, or without "
             "bound), so one client's influence on the sum is not the clip C: use privacy.dp = 'client'",
    "frl": "FRL's vote is a sum of rank positions, not of updates the server could clip: use privacy.dp = 'client'",
    "ferret": "Ferret's uploads are coordinates on random bases, not updates the server could clip: use "
              "privacy.dp = 'client'",
}
# Strategies whose aggregate is a (weighted) sum that secure aggregation is wired to: FedAU's weights are
# applied on the client, FRL sums rank positions, Ferret dense tables, ZO per-seed scalar sums.
SECURE_SUM = ("fedavg", "fedsb", "fedau", "ferret", "zo", "frl")
# Why the others cannot use secure aggregation.
NO_SECURE_SUM = {
    "flora": "FLoRA stacks every client's own LoRA factors B_k, A_k (their sum is not the update), so the "
             "server must see each client's factors individually",
    "median": "the coordinate-wise median needs every individual update",
    "zeropad": "zero-padded heterogeneous LoRA averages factors of different ranks per client",
}


def check(cfg: RunConfig) -> None:
    """Raise ConfigError for a privacy setting that cannot work with the rest of `cfg`."""
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
    if p.dp == "client" and name not in CLIENT_DP:
        raise ConfigError(f"privacy.dp = 'client' is wired for strategies {', '.join(CLIENT_DP)}; "
                          f"strategy {name!r} does not train through DP-SGD")
    if p.dp == "central" and name not in CENTRAL_DP:
        why = NO_CENTRAL_DP.get(name, "it uploads something the server cannot clip as an update")
        raise ConfigError(f"privacy.dp = 'central' is wired for strategies {', '.join(CENTRAL_DP)}, not "
                          f"{name!r}: {why}")
    if name == "fedsb" and cfg.strategy.get("init_upload") == "sign" and (p.secure_aggregation or p.dp == "central"):
        raise ConfigError("strategy.init_upload = 'sign' sends packed sign bits, which the server must unpack one "
                          "client at a time: they can be neither masked into a sum nor clipped and noised; use "
                          "init_upload = 'gradient' with secure aggregation or central DP")
    if p.secure_aggregation:
        if name not in SECURE_SUM:
            why = NO_SECURE_SUM.get(name, "its aggregate is not wired as a sum")
            raise ConfigError(f"privacy.secure_aggregation cannot be used with strategy {name!r}: {why}")
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
