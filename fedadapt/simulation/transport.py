"""In-process transport: virtual clients that share ONE model and swap only adapter state.

A virtual client is its data partition and nothing else; the model, its frozen base weights and the
recipe are shared. Payloads still go through the codec both ways, so the engine validates and counts
exactly the bytes a real deployment would send. A virtual client whose training produced NaN or Inf
still uploads (`client_upload`): the engine rejects that result with its reason and the round goes on,
as a coordinator does with a bad upload, instead of the whole simulation stopping at the client.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from safetensors.torch import save as _st_save

from fedadapt.core import codec
from fedadapt.core.errors import PayloadError
from fedadapt.models.classifier import Features
from fedadapt.server.engine import ResultMessage, TaskMessage
from fedadapt.strategies.base import ClientInfo, ClientRecipe, Task


def client_upload(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The bytes a virtual client sends. `codec.encode` refuses NaN/Inf; a simulated client sends such
    tensors anyway (plain safetensors), so the engine's `codec.decode` rejects the result, with the reason,
    like any other bad upload: one client's diverged training costs its result, not the run."""
    try:
        return codec.encode(tensors)
    except PayloadError as refused:
        if not all(isinstance(t, torch.Tensor) and t.dtype in codec.ALLOWED_DTYPES for t in tensors.values()):
            raise  # not a bad value but a bug in the recipe: no client could send it
        try:
            return _st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
        except Exception:
            raise refused from None


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
                                         client_upload(result.tensors)))
            self.on_client_done(msg.client_id)
        return results
