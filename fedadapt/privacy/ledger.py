"""Privacy accounting: a ledger of (noise multiplier, sample rate, steps) entries read by opacus' own
accountants, so the epsilon reported is exactly what opacus would say for the same steps.

A ledger is plain data (JSON-ready lists) so a client, a coordinator's store and the round metrics can
keep it; the accountant object is rebuilt on demand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from fedadapt.core.errors import ConfigError

BUDGET_SLACK = 1e-9  # relative: calibrated noise lands on the budget up to float rounding


def accountant(kind: str, history: list[tuple[float, float, int]]):
    """An opacus accountant of `kind` ("rdp" or "prv") holding `history`."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if kind == "rdp" else PRVAccountant()
    acc.history = [(float(z), float(q), int(n)) for z, q, n in history]
    return acc


def epsilon_of(history: list[tuple[float, float, int]], delta: float, kind: str = "rdp") -> float:
    """Epsilon spent by `history` at `delta`; 0 for no steps, inf if any step had no noise."""
    return _epsilon(tuple((float(z), float(q), int(n)) for z, q, n in history), delta, kind)


@lru_cache(maxsize=4096)  # a client's check before a run and its report after it ask for the same history
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, kind: str) -> float:
    steps = [h for h in history if h[2] > 0 and h[1] > 0]
    if not steps:
        return 0.0
    if any(z <= 0 for z, _, _ in steps):
        return math.inf
    return float(accountant(kind, steps).get_epsilon(delta))


def calibrate(epsilon: float, delta: float, sample_rate: float, steps: int, kind: str = "rdp") -> float:
    """The noise multiplier with which `steps` steps at `sample_rate` spend at most `epsilon` (within 0.1%).

    The rate is rounded UP to two significant digits first (more noise, never less), so clients of
    similar sizes share one cached search; the ledger still accounts each client at its exact rate.
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ConfigError(f"cannot calibrate noise for epsilon {epsilon}: give privacy.epsilon > 0")
    if not 0 < sample_rate <= 1 or steps <= 0:
        raise ConfigError(f"cannot calibrate noise for sample rate {sample_rate} and {steps} steps")
    digits = 10 ** (1 - math.floor(math.log10(sample_rate)))
    return _search(epsilon, delta, min(1.0, math.ceil(sample_rate * digits - 1e-9) / digits), steps, kind)


_INT_ORDERS = [*range(2, 11), *range(12, 64)]  # the integer orders among opacus' defaults: never below them


@lru_cache(maxsize=1024)
def _search(epsilon: float, delta: float, q: float, steps: int, kind: str) -> float:
    """Bisection on log(z) with opacus' accountant (its own search evaluates it far more often). RDP is
    evaluated at integer orders only: 10x faster, and never below the full-order epsilon (conservative)."""
    def spend(z: float) -> float:  # decreasing in z
        if kind != "rdp":
            return epsilon_of([(z, q, steps)], delta, kind)
        return float(accountant("rdp", [(z, q, steps)]).get_epsilon(delta, alphas=_INT_ORDERS))

    lo, hi = 0.5, 1.0
    while spend(hi) > epsilon:
        lo, hi = hi, hi * 2
    while spend(lo) <= epsilon and lo > 1e-3:
        lo, hi = lo / 2, lo
    for _ in range(14):  # hi / lo = 2 -> 2^(1/16384)
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if spend(mid) <= epsilon else (mid, hi)
    return hi


@dataclass
class Ledger:
    """One party's spending: history entries and the budget they are checked against."""

    budget: float
    delta: float
    kind: str = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def spent(self) -> float:
        return epsilon_of(self.history, self.delta, self.kind)

    def would_spend(self, noise: float, sample_rate: float, steps: int) -> float:
        """Epsilon after `steps` more steps (not recorded)."""
        return epsilon_of(self.history + [(noise, sample_rate, steps)], self.delta, self.kind)

    def record(self, noise: float, sample_rate: float, steps: int) -> None:
        last = self.history[-1] if self.history else None
        if last is not None and last[0] == noise and last[1] == sample_rate:
            self.history[-1] = (noise, sample_rate, last[2] + steps)  # same mechanism: one entry
        else:
            self.history.append((noise, sample_rate, steps))

    def to_dict(self) -> dict:
        return {"budget": self.budget, "delta": self.delta, "kind": self.kind,
                "history": [list(h) for h in self.history]}

    @classmethod
    def from_dict(cls, d: dict) -> Ledger:
        return cls(float(d["budget"]), float(d["delta"]), str(d.get("kind", "rdp")),
                   [(float(z), float(q), int(n)) for z, q, n in d.get("history", [])])
