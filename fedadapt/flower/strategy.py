"""Any fedadapt ServerStrategy as a Flower 1.42 Message-API `Strategy`.

The adapter holds a `RoundEngine` and lets Flower carry the messages: `configure_train` is the engine's
`open_round` (the strategy's own seeded client choice and per-client tasks: FLoRA ranks and catch-up,
Fed-SB's R, ... each task its own Message to its node), `aggregate_train` its `close_round` (the same
checks of every upload: asked client, current round, example count, payload contract, NaN/Inf, size;
then the strategy's aggregate in client-id order, and the optional server-side evaluation). Nothing of a
method is implemented here.

Flower addresses nodes by random 64-bit ids; fedadapt by client id. Before a node is first used it is
asked (a QUERY message) which client it is and how many examples it holds. The global state lives in the
engine; the `arrays` and `config` Flower's `start` passes in are not read (fedadapt's own config sets the
training options), and what `aggregate_train` returns is the global adapter for `Result.arrays`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedadapt.core import codec
from fedadapt.core.errors import PayloadError
from fedadapt.core.rng import derive_seed
from fedadapt.runtime.engine import ResultMessage, RoundEngine, RoundRecord, TaskMessage
from fedadapt.strategies.base import ClientInfo, GlobalState, ModelSpec, ServerStrategy, sample_clients

from . import wire


class FedadaptStrategy(Strategy):
    def __init__(self, strategy: ServerStrategy, spec: ModelSpec, *, num_rounds: int, min_nodes: int,
                 min_results: int = 1, max_payload_bytes: int = codec.DEFAULT_MAX_BYTES,
                 evaluate: Callable[[GlobalState], dict[str, float]] | None = None, eval_every: int = 1,
                 fraction_evaluate: float = 0.0, eval_batch_size: int = 128, seed: int = 0,
                 wait_for_nodes: float = 120.0, on_round: Callable[[RoundRecord], None] = lambda r: None):
        # transport=None: Flower's Grid moves the messages, the engine never calls a transport here
        self.engine = RoundEngine(strategy, None, spec, min_results=min_results, max_payload_bytes=max_payload_bytes,
                                  evaluate=evaluate, eval_every=eval_every)
        self.num_rounds = num_rounds
        self.min_nodes = min_nodes
        self.fraction_evaluate = fraction_evaluate
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.wait_for_nodes = wait_for_nodes
        self.on_round = on_round
        self.records: list[RoundRecord] = []
        self.clients: dict[int, ClientInfo] = {}  # node id -> the client it said it is
        self._ignored: set[int] = set()  # nodes that did not answer the query properly
        self._open: tuple | None = None  # (round, tasks, messages, client id -> node id, start time)

    @property
    def state(self) -> GlobalState:
        return self.engine.state

    # ------------------------------------------------------------------------------------------ nodes
    def _discover(self, grid: Grid) -> None:
        """Map every new node to its client. Waits for `min_nodes` first: sampling before all nodes are
        up would pick from a smaller set than the simulator's (Flower's own first-round race, P6)."""
        deadline = time.monotonic() + self.wait_for_nodes
        while True:
            nodes = set(grid.get_node_ids())
            if len(nodes) >= self.min_nodes or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        new = sorted(nodes - self.clients.keys() - self._ignored)
        if not new:
            return
        asks = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
        known = {c.client_id: n for n, c in self.clients.items()}
        for r in grid.send_and_receive(asks, timeout=self.wait_for_nodes):
            node = r.metadata.src_node_id
            try:
                if r.has_error():
                    raise PayloadError(f"error {r.error.code}: {r.error.reason}")
                info = wire.client_of(r.content)
                if info["client_id"] in known:
                    raise PayloadError(f"client id {info['client_id']!r} is already node {known[info['client_id']]}")
            except PayloadError as exc:
                log(WARNING, "fedadapt: ignoring node %s: %s", node, exc)
                self._ignored.add(node)
                continue
            caps = info.get("capabilities")
            self.clients[node] = ClientInfo(info["client_id"], int(info.get("num_examples") or 0),
                                            caps if isinstance(caps, dict) else {})
            known[info["client_id"]] = node
        if not self.clients:  # e.g. the simulation runtime crashed: fail now, not after every round's timeout
            raise RuntimeError(f"none of {len(new)} Flower nodes answered fedadapt's query within "
                               f"{self.wait_for_nodes:.0f}s; see the log above for the ClientApp's error")

    # ------------------------------------------------------------------------------------------ train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        start = time.perf_counter()
        self._discover(grid)
        node_of = {c.client_id: n for n, c in self.clients.items()}
        tasks, messages = self.engine.open_round(server_round, list(self.clients.values()))
        self._open = (server_round, tasks, messages, node_of, start)
        return [Message(wire.task_content(m), dst_node_id=node_of[m.client_id], message_type=MessageType.TRAIN,
                        group_id=str(server_round)) for m in messages]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd, tasks, messages, node_of, start = self._open
        assert rnd == server_round, f"aggregate_train for round {server_round}, but round {rnd} is open"
        self._open = None
        results, malformed, failed = [], {}, {}
        for r in replies:
            node = r.metadata.src_node_id
            cid = self.clients[node].client_id if node in self.clients else f"flower-node-{node}"
            if r.has_error():  # the ClientApp raised: the engine records "no result", we add Flower's reason
                failed[cid] = f"client error: {str(r.error.reason)[-300:]}"
                continue
            try:
                results.append(wire.result_of(r.content, cid))
            except PayloadError as exc:
                malformed[cid] = str(exc)
        record = self.engine.close_round(rnd, tasks, messages, results, start=start, last=rnd >= self.num_rounds)
        for cid, reason in malformed.items():  # a reply the wire format could not read: rejected, as the engine would
            record.rejected[cid] = reason
            if cid in record.per_client:
                record.per_client[cid].update(status="rejected", reason=reason)
        for cid, reason in failed.items():
            if record.per_client.get(cid, {}).get("status") == "failed":
                record.per_client[cid]["reason"] = reason
        self.records.append(record)
        self.on_round(record)
        return global_arrays(self.state), round_metrics(record)

    # --------------------------------------------------------------------------------------- evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Federated evaluation of the global state on a seeded sample of clients (none by default: like
        fedadapt's simulator, the adapter evaluates on the server through `evaluate`)."""
        if self.fraction_evaluate <= 0 or not self.clients:
            return []
        k = max(1, math.ceil(self.fraction_evaluate * len(self.clients)))
        chosen = sample_clients(list(self.clients.values()), k, derive_seed(self.seed, "flower-evaluate"),
                                server_round)
        payload = codec.encode(self.state.tensors)
        node_of = {c.client_id: n for n, c in self.clients.items()}
        return [Message(wire.task_content(TaskMessage(c.client_id, server_round, "evaluate",
                                                      {"batch_size": self.eval_batch_size}, payload)),
                        dst_node_id=node_of[c.client_id], message_type=MessageType.EVALUATE,
                        group_id=str(server_round)) for c in chosen]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' metrics."""
        rows: list[ResultMessage] = []
        for r in replies:
            if r.has_error():
                continue
            try:
                res = wire.result_of(r.content, "")
            except PayloadError:
                continue
            if isinstance(res.num_examples, int) and res.num_examples > 0:
                rows.append(res)
        if not rows:
            return None
        total = sum(r.num_examples for r in rows)
        keys = set.intersection(*(set(r.metrics) for r in rows))
        return MetricRecord({k: sum(float(r.metrics[k]) * r.num_examples for r in rows) / total for k in sorted(keys)}
                            | {"num-examples": total})

    def summary(self) -> None:
        s = self.engine.strategy
        log(INFO, "\t├── fedadapt strategy %r, %d rounds, waits for %d nodes", s.name, self.num_rounds, self.min_nodes)
        log(INFO, "\t└── options %s", s.options)


def global_arrays(state: GlobalState) -> ArrayRecord:
    """The global adapter as a plain Flower ArrayRecord (`Result.arrays.to_torch_state_dict()` gives it back;
    numpy-backed, so bfloat16 adapters would need a cast)."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.tensors.items()})


def round_metrics(rec: RoundRecord) -> MetricRecord:
    m: dict[str, float | int] = {"clients": len(rec.clients), "rejected": len(rec.rejected),
                                 "bytes-up": rec.bytes_up, "bytes-down": rec.bytes_down}
    for k in ("loss", "accuracy", "eval_loss"):
        v = getattr(rec, k)
        if v is not None:
            m[k] = float(v)
    m.update({f"strategy.{k}": float(v) for k, v in rec.strategy.items()
              if isinstance(v, (int, float)) and math.isfinite(v)})
    return MetricRecord(m)
