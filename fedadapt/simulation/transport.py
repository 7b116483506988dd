"""In-process transport: virtual clients that share ONE model and swap only adapter state.

A virtual client is its data partition and nothing else; the model, its frozen base weights and the
recipe are shared, and every task runs through the same executor a client daemon uses
(runtime/executor.py). Payloads still go through the codec both ways, so the engine validates and counts
exactly the bytes a real deployment would send.
"""

from __future__ import annotations

from collections.abc import Callable

from fedadapt.models.classifier import Features
from fedadapt.runtime.engine import ResultMessage, TaskMessage
from fedadapt.runtime.executor import Executor
from fedadapt.strategies.base import ClientInfo


class InProcessTransport:
    def __init__(self, executor: Executor, data: dict[str, Features],
                 on_client_done: Callable[[str], None] = lambda cid: None):
        self.executor = executor
        self.data = data
        self.on_client_done = on_client_done

    def clients(self) -> list[ClientInfo]:
        return [ClientInfo(cid, len(d)) for cid, d in self.data.items()]

    def run(self, tasks: list[TaskMessage], *, timeout: float | None) -> list[ResultMessage]:
        # Sequential and in task order: the result of a seeded run cannot depend on scheduling.
        results = []
        for msg in tasks:
            results.append(self.executor.run(msg, self.data[msg.client_id]))
            self.on_client_done(msg.client_id)
        return results
