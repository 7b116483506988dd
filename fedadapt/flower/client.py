"""A fedadapt client (its executor and data) as a Flower 1.42 `ClientApp`.

Train and evaluate messages run through the executor every fedadapt client uses (runtime/executor.py):
decode the task, `recipe.prepare`, `recipe.train` or `recipe.evaluate`, check and encode the result. So a
Flower node computes exactly what a virtual client of `fedadapt simulate` or a client daemon computes from
the same task, down to the bits, and answers a task it cannot run the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedadapt.runtime.executor import Executor

from . import wire


@dataclass
class Participant:
    """Who a node is: its fedadapt client id, the executor it runs tasks with (its model and recipe; may be
    shared by every node in a process, as the simulator's virtual clients share one) and its data."""

    client_id: str
    executor: Executor
    data: Any
    capabilities: dict[str, Any] = field(default_factory=dict)


def client_app(load: Callable[[Context], Participant]) -> ClientApp:
    """`load(context)` says which client a node is (e.g. from `context.node_config["partition-id"]`);
    it is called for every message, so it should cache what is costly to build."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        p = load(context)
        return wire.reply(wire.query_content(p.client_id, len(p.data), p.capabilities), msg)

    def run(msg: Message, context: Context) -> Message:
        p = load(context)
        task = wire.task_of(msg.content)  # its kind says train or evaluate
        task.client_id = p.client_id  # who the node is, not what the message claims
        return wire.reply(wire.result_content(p.executor.run(task, p.data)), msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return run(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return run(msg, context)

    return app
