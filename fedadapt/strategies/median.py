"""Coordinate-wise median (Yin et al., ICML 2018): the robust baseline for weight-sending strategies.

Each coordinate of the new global adapter is the median of the clients' values (the mean of the two
middle ones for an even count, as numpy and Flower's FedMedian). Example counts are ignored on
purpose: a client could inflate its own. With fewer than half the clients malicious, every coordinate
stays within the range of the honest values, however far the malicious ones are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedadapt.core.config import Section

from .base import NO_PRIVACY, ClientResult, GlobalState, RoundOutcome, Tensors
from .fedavg import FedAvg


def coordinate_median(models: list[Tensors]) -> Tensors:
    """Per tensor and coordinate, the median over models; non-float tensors are taken from the first."""
    out: Tensors = {}
    for name, first in models[0].items():
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        s = torch.stack([m[name] for m in models]).sort(dim=0).values
        k = len(models)
        out[name] = (s[(k - 1) // 2] + s[k // 2]) / 2  # exact for odd k: (x + x) / 2 == x
    return out


@dataclass
class MedianOptions(Section):
    """No options: the median has no weights and no server learning rate."""


class Median(FedAvg):  # same client side, initial state and upload contract as FedAvg
    name = "median"
    Options = MedianOptions
    privacy = NO_PRIVACY.but(secure_aggregation="the coordinate-wise median needs every individual update")

    def aggregate(self, rnd: int, results: list[ClientResult], state: GlobalState) -> RoundOutcome:
        return RoundOutcome(GlobalState(coordinate_median([r.tensors for r in results]), {}, rnd), {})
