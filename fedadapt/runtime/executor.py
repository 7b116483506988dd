"""One task on one client, the same wherever it runs: the client daemon, the simulator's virtual clients
and Flower's ClientApp all call `Executor.run`.

    decode the task -> recipe.prepare -> recipe.train | recipe.evaluate -> check the result -> encode it

What cannot be done is answered, not raised, so one client's trouble costs its result and never the
daemon or the simulation: a task that does not fit this client (a payload out of step with what it holds,
a model or data it lacks, a privacy budget it would exceed) and a local run that diverged (NaN or Inf in
what it would upload) both come back as a result with no tensors and the one-line reason in
`metrics["refused"]`, which the round engine records as the client's rejection. Only bugs raise.
"""

from __future__ import annotations

from typing import Any

import torch

from fedadapt.core import codec
from fedadapt.core.errors import FedadaptError, PayloadError
from fedadapt.strategies.base import ClientRecipe, Task

from .engine import ResultMessage, TaskMessage

REFUSED = "refused"  # the metric that carries why a client sends no update


class Executor:
    """Runs tasks on one model, for whichever client's data it is given (a daemon serves one client; the
    simulator's virtual clients share one model and swap only adapter state)."""

    def __init__(self, model: torch.nn.Module, recipe: ClientRecipe, max_payload_bytes: int = codec.DEFAULT_MAX_BYTES):
        self.model = model
        self.recipe = recipe
        self.max_payload_bytes = max_payload_bytes

    def run(self, msg: TaskMessage, data: Any) -> ResultMessage:
        """The result of task `msg` on `data`, stamped with the client the task was for."""
        try:
            task = Task(msg.kind, msg.round, msg.config, codec.decode(msg.payload, max_bytes=self.max_payload_bytes))
            if task.kind == "evaluate":
                return ResultMessage(msg.client_id, msg.round, len(data), self.evaluate(task, data), b"")
            self.recipe.prepare(self.model, task)
            result = self.recipe.train(self.model, data, task)
        except FedadaptError as exc:  # the task does not fit this client: say so, stay up
            return refusal(msg, len(data), f"cannot run the task: {exc}")
        if REFUSED in result.metrics:  # e.g. at its privacy budget: the recipe says why, with its own metrics
            return ResultMessage(msg.client_id, msg.round, result.num_examples, result.metrics, codec.encode({}))
        try:
            payload = codec.encode(result.tensors)
        except PayloadError as exc:
            if not all(isinstance(t, torch.Tensor) and t.dtype in codec.ALLOWED_DTYPES for t in result.tensors.values()):
                raise  # not a value the training produced but a recipe that uploads what no client can send
            return refusal(msg, result.num_examples, f"local training diverged: {exc}")
        return ResultMessage(msg.client_id, msg.round, result.num_examples, result.metrics, payload)

    def evaluate(self, task: Task, data: Any) -> dict[str, float]:
        """Metrics of the model that `task` describes on `data` (also the server's own evaluation)."""
        self.recipe.prepare(self.model, task)
        return self.recipe.evaluate(self.model, data, task)


def refusal(msg: TaskMessage, num_examples: int, why: str) -> ResultMessage:
    """The answer of a client that sends no update for `msg`, and why."""
    return ResultMessage(msg.client_id, msg.round, num_examples, {REFUSED: why}, codec.encode({}))
