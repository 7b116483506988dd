"""A fedadapt client (model, data, ClientRecipe) as a Flower 1.42 `ClientApp`.

Training runs through the simulator's own `InProcessTransport` for this one client: decode the task,
`recipe.prepare`, `recipe.train`, encode the upload. So a Flower node computes exactly what a virtual
client of `fedadapt simulate` computes from the same task, down to the bits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedadapt.core import codec
from fedadapt.server.engine import ResultMessage
from fedadapt.simulation.transport import InProcessTransport
from fedadapt.strategies.base import ClientRecipe, Task

from . import wire


@dataclass
class Participant:
    """Who a node is: its fedadapt client id, the model it trains (may be shared by every node in a
    process, as the simulator's virtual clients share one), the strategy's recipe and its data."""

    client_id: str
    model: Any
    recipe: ClientRecipe
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

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        p = load(context)
        task = wire.task_of(msg.content)
        (result,) = InProcessTransport(p.model, p.recipe, {task.client_id: p.data}).run([task], timeout=None)
        result.client_id = p.client_id
        return wire.reply(wire.result_content(result), msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        p = load(context)
        t = wire.task_of(msg.content)
        task = Task("evaluate", t.round, t.config, codec.decode(t.payload))
        p.recipe.prepare(p.model, task)
        metrics = p.recipe.evaluate(p.model, p.data, task)
        result = ResultMessage(p.client_id, t.round, len(p.data), metrics, b"")
        return wire.reply(wire.result_content(result), msg)

    return app
