"""A recipe whose training diverges for one client: the same NaN-producing task for every path that runs
tasks (the simulator, a client daemon, Flower's ClientApp; tests/flower_inproc.py imports it too)."""

from __future__ import annotations

from dataclasses import replace

import torch


class NaNFor:
    """Wraps a recipe: the client training on `target` (that data object) returns NaN tensors from round
    `start` on; everyone else trains as the inner recipe does."""

    def __init__(self, inner, target, start: int = 1):
        self.inner, self.target, self.start = inner, target, start

    def prepare(self, model, task):
        self.inner.prepare(model, task)

    def evaluate(self, model, data, task):
        return self.inner.evaluate(model, data, task)

    def train(self, model, data, task, privacy=None):
        result = self.inner.train(model, data, task)
        if data is self.target and task.round >= self.start:
            result = replace(result, tensors={k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                              for k, v in result.tensors.items()})
        return result
