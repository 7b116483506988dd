"""The round engine: configure -> send -> collect -> validate -> aggregate -> evaluate -> record.

It knows nothing of gRPC or of virtual clients: it talks to a `Transport`, which moves encoded
tasks and results. Every result is checked (asked client, current round, sane example count, payload
contract) before it can touch the global state; rejected ones are recorded with their reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedadapt.core import codec
from fedadapt.core.errors import PayloadError
from fedadapt.strategies.base import ClientInfo, ClientResult, GlobalState, ModelSpec, ServerStrategy, Task

MAX_EXAMPLES = 10**9  # a client reporting more is lying or broken; it would dominate the weights


@dataclass
class TaskMessage:
    client_id: str
    round: int
    kind: str
    config: dict[str, Any]
    payload: bytes


@dataclass
class ResultMessage:
    client_id: str
    round: int
    num_examples: int
    metrics: dict[str, Any]
    payload: bytes


class Transport(Protocol):
    def clients(self) -> list[ClientInfo]:
        """Clients available for the next round."""

    def run(self, tasks: list[TaskMessage], *, timeout: float | None) -> list[ResultMessage]:
        """Deliver tasks and return the results that arrived before `timeout` seconds."""


@dataclass
class RoundRecord:
    round: int
    loss: float | None
    accuracy: float | None
    eval_loss: float | None
    bytes_up: int
    bytes_down: int
    clients: list[str]
    rejected: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None  # why the global state was left unchanged, if it was
    seconds: float = 0.0
    strategy: dict[str, float] = field(default_factory=dict)
    perplexity: float | None = None  # causal-lm: of the global model on the held-out subset (eval rounds)
    # client -> {"status": accepted|rejected|failed, "reason", "up", "down"} for every client asked: accepted
    # (its result counted), rejected (every result it sent was refused; the first reason), failed (none came);
    # up = every byte it sent this round, down = its task's bytes
    per_client: dict[str, dict[str, Any]] = field(default_factory=dict)


class RoundEngine:
    def __init__(self, strategy: ServerStrategy, transport: Transport, spec: ModelSpec, *,
                 min_results: int = 1, round_timeout: float | None = None,
                 max_payload_bytes: int = codec.DEFAULT_MAX_BYTES,
                 evaluate: Callable[[GlobalState], dict[str, float]] | None = None, eval_every: int = 1):
        self.strategy = strategy
        self.transport = transport
        self.state = strategy.init_state(spec)
        self.min_results = min_results
        self.round_timeout = round_timeout
        self.max_payload_bytes = max_payload_bytes
        self.evaluate = evaluate
        self.eval_every = eval_every

    def run(self, rounds: int, on_round: Callable[[RoundRecord], None] = lambda r: None) -> GlobalState:
        for rnd in range(self.state.round + 1, rounds + 1):
            record = self.run_round(rnd, last=rnd == rounds)
            on_round(record)
        return self.state

    def run_round(self, rnd: int, *, last: bool = False) -> RoundRecord:
        start = time.perf_counter()
        tasks, messages = self.open_round(rnd, self.transport.clients())
        replies = self.transport.run(messages, timeout=self.round_timeout)
        return self.close_round(rnd, tasks, messages, replies, start=start, last=last)

    # A round's two halves, apart so that a runtime driving the exchange itself (Flower's Strategy API,
    # fedadapt.flower) runs this very configure, validation and aggregation rather than a copy of them.
    def open_round(self, rnd: int, clients: list[ClientInfo]) -> tuple[dict[str, Task], list[TaskMessage]]:
        tasks = self.strategy.configure(rnd, clients, self.state)
        messages, encoded = [], {}
        for cid, task in tasks.items():
            key = id(task.tensors)  # a broadcast dict is encoded once, whatever the number of clients
            if key not in encoded:
                encoded[key] = codec.encode(task.tensors)
            messages.append(TaskMessage(cid, rnd, task.kind, task.config, encoded[key]))
        return tasks, messages

    def close_round(self, rnd: int, tasks: dict[str, Task], messages: list[TaskMessage],
                    replies: list[ResultMessage], *, start: float, last: bool = False) -> RoundRecord:
        bytes_down = sum(len(m.payload) for m in messages)
        bytes_up = sum(len(r.payload) for r in replies)
        accepted: dict[str, ClientResult] = {}
        rejected: dict[str, str] = {}
        up: dict[str, int] = {}
        for reply in replies:
            up[reply.client_id] = up.get(reply.client_id, 0) + len(reply.payload)
            try:
                accepted[reply.client_id] = self._accept(reply, rnd, tasks, accepted.keys())
            except PayloadError as exc:
                rejected.setdefault(reply.client_id, str(exc))
        for cid in accepted:  # a client whose result counts is not rejected for a duplicate or a stale copy
            rejected.pop(cid, None)

        record = RoundRecord(rnd, None, None, None, bytes_up, bytes_down, sorted(accepted), rejected)
        for m in messages:
            status = "accepted" if m.client_id in accepted else "rejected" if m.client_id in rejected else "failed"
            reason = rejected.get(m.client_id, "" if status == "accepted" else "no result")
            record.per_client[m.client_id] = {"status": status, "reason": reason,
                                              "up": up.get(m.client_id, 0), "down": len(m.payload)}
        if len(accepted) < self.min_results:
            record.skipped = f"{len(accepted)} valid results, fewer than min_results={self.min_results}"
        else:
            results = [accepted[cid] for cid in sorted(accepted)]  # aggregation order must not depend on arrival
            outcome = self.strategy.aggregate(rnd, results, self.state)
            self.state = outcome.state
            record.strategy = outcome.metrics
            losses = [(r.metrics["loss"], r.num_examples) for r in results if "loss" in r.metrics]
            if losses:
                record.loss = sum(l * n for l, n in losses) / sum(n for _, n in losses)
        self.state.round = rnd
        if self.evaluate is not None and (last or rnd % self.eval_every == 0):
            metrics = self.evaluate(self.state)
            record.accuracy, record.eval_loss = metrics.get("accuracy"), metrics.get("loss")
            record.perplexity = metrics.get("perplexity")
        record.seconds = time.perf_counter() - start
        return record

    def _accept(self, reply: ResultMessage, rnd: int, asked: dict[str, Task], seen: Collection[str]) -> ClientResult:
        if reply.client_id not in asked:
            raise PayloadError(f"client {reply.client_id!r} was not asked to train in round {rnd}")
        if reply.client_id in seen:
            raise PayloadError(f"duplicate result from client {reply.client_id!r}")
        if reply.round != rnd:
            raise PayloadError(f"stale result for round {reply.round}, the current round is {rnd}")
        refused = reply.metrics.get("refused")  # the client sent no update, and why (runtime/executor.py)
        if isinstance(refused, str) and refused:
            self.strategy.refused(reply.client_id, _finite_metrics(reply.metrics))  # e.g. at its privacy budget
            raise PayloadError(f"client sent no update: {refused[:300]}")
        n = reply.num_examples
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_EXAMPLES:
            raise PayloadError(f"num_examples must be an integer in [1, {MAX_EXAMPLES}], got {n!r}")
        contract = self.strategy.task_contract(self.state, asked[reply.client_id])  # per client: shapes may vary
        tensors = codec.decode(reply.payload, contract=contract, max_bytes=self.max_payload_bytes)
        return ClientResult(reply.client_id, n, tensors, _finite_metrics(reply.metrics))


def _finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in ((k, _as_finite_float(v)) for k, v in metrics.items()) if v is not None}


def _as_finite_float(v: Any) -> float | None:
    """A client-reported metric as a finite float, or None (strings, bools, NaN, and ints too big for a float)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None
