"""In-process clients that each keep their OWN model, as client daemons do (the simulator's virtual clients
share one): each runs its tasks through its own runtime Executor, so late joiners must catch up."""

from __future__ import annotations

import copy

from fedadapt.core import codec
from fedadapt.runtime.executor import Executor
from fedadapt.strategies.base import ClientInfo


class OwnModels:
    """A Transport. `uploads` keeps every decoded upload, `seen` (round, client) of every task run."""

    def __init__(self, model, recipe, data):
        self.executors = {cid: Executor(copy.deepcopy(model), recipe) for cid in data}
        self.data = data
        self.uploads: list[dict] = []
        self.seen: list[tuple[int, str]] = []

    def clients(self):
        return [ClientInfo(cid, len(d)) for cid, d in self.data.items()]

    def model(self, client: str):
        return self.executors[client].model

    def run(self, tasks, *, timeout):
        out = [self.executors[m.client_id].run(m, self.data[m.client_id]) for m in tasks]
        self.seen += [(m.round, m.client_id) for m in tasks]
        self.uploads += [codec.decode(r.payload) for r in out]
        return out
