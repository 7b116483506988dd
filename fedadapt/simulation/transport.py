"""In-process transport: virtual clients that share ONE model and swap only adapter state.

A virtual client is its data partition and nothing else; the model, its frozen base weights and the
recipe are shared. Payloads still go through the codec both ways, so the engine validates and counts
exactly the bytes a real deployment would send.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedadapt.core import codec
from fedadapt.models.classifier import Features
from fedadapt.server.engine import ResultMessage, TaskMessage
from fedadapt.strategies.base import ClientInfo, ClientRecipe, Task


class InProcessTransport:
    def __init__(self, model: torch.nn.Module, recipe: ClientRecipe, data: dict[str, Features],
                 on_client_done: Callable[[str], None] = lambda cid: None):
        self.model = model
        self.recipe = recipe
        self.data = data
        self.on_client_done = on_client_done

    def clients(self) -> list[ClientInfo]:
        return [ClientInfo(cid, len(d)) for cid, d in self.data.items()]

    def run(self, tasks: list[TaskMessage], *, timeout: float | None) -> list[ResultMessage]:
        # Sequential and in task order: the result of a seeded run cannot depend on scheduling.
        results = []
        for msg in tasks:
            task = Task(msg.kind, msg.round, msg.config, codec.decode(msg.payload))
            self.recipe.prepare(self.model, task)
            result = self.recipe.train(self.model, self.data[msg.client_id], task)
            results.append(ResultMessage(msg.client_id, msg.round, result.num_examples, result.metrics,
                                         codec.encode(result.tensors)))
            self.on_client_done(msg.client_id)
        return results
