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
    # the examples the client said it holds when it sent this (a coordinator stamps what the client declared at
    # Join); None: what the transport's clients() said when the round opened
    registered: int | None = None
    # RoundEngine.check_answer's verdict, kept so that close_round does not decode the payload a second time:
    # (task, global state, ClientResult or PayloadError), used only for the same task and state
    checked: Any = field(default=None, repr=False, compare=False)


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
        self._registered: dict[str, int] = {}  # examples each client of the open round said it holds
        self._open: dict[str, Task] = {}  # the open round's tasks, by client

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
        self._registered = {c.client_id: c.num_examples for c in clients}
        tasks = self.strategy.configure(rnd, clients, self.state)
        self._open = tasks
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
        if _refusal(reply) is not None:
            self.strategy.refused(reply.client_id, _finite_metrics(reply.metrics))  # e.g. at its privacy budget
        task = asked[reply.client_id]
        cached = reply.checked
        if cached is not None and cached[0] is task and cached[1] is self.state:  # judged when it arrived
            if isinstance(cached[2], PayloadError):
                raise cached[2]
            return cached[2]
        return self.check(reply, task)

    def check_answer(self, reply: ResultMessage) -> None:
        """`check` against the open round's task of the client that sent `reply` (PayloadError if none); the
        verdict is kept on `reply` for `close_round`."""
        task = self._open.get(reply.client_id)
        if task is None:
            raise PayloadError(f"client {reply.client_id!r} was not asked to train in this round")
        state = self.state
        try:
            verdict = self.check(reply, task)
        except PayloadError as exc:
            reply.checked = (task, state, exc)
            raise
        reply.checked = (task, state, verdict)

    def check(self, reply: ResultMessage, task: Task) -> ClientResult:
        """`reply` as the answer to `task`, validated (a refusal, the example count and what the task allows,
        the strategy's payload contract, finiteness), or PayloadError with the reason. No side effect: a
        coordinator calls it when an upload arrives, to tell the client at once, and `close_round` judges
        every result again the same way."""
        refused = _refusal(reply)
        if refused is not None:
            raise PayloadError(f"client sent no update: {refused[:300]}")
        n = reply.num_examples
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_EXAMPLES:
            raise PayloadError(f"num_examples must be an integer in [1, {MAX_EXAMPLES}], got {n!r}")
        if task.kind == "train":
            registered = reply.registered if reply.registered is not None else self._registered.get(reply.client_id, 0)
            allowed, why = examples_allowed(task.config, registered)
            if n > allowed:
                raise PayloadError(f"num_examples {n} is more than this task allows: {allowed} ({why})")
        contract = self.strategy.task_contract(self.state, task)  # per client: shapes may vary
        tensors = codec.decode(reply.payload, contract=contract, max_bytes=self.max_payload_bytes)
        return ClientResult(reply.client_id, n, tensors, _finite_metrics(reply.metrics))


def examples_allowed(config: dict[str, Any], registered: int) -> tuple[int, str]:
    """The most examples a client can claim for a training task, and why: what the task lets it train on
    (local steps x batch size; local epochs x the examples it registered), and never less than what it
    registered (FedAvg weighs a client by the size of its data, which an honest client reports). A claim
    above this would let one client outweigh the others at will."""
    registered = max(int(registered or 0), 0)
    try:
        epochs = int(config.get("local_epochs", 0) or 0)
        steps = int(config.get("local_steps", 0) or 0)
        batch = int(config.get("batch_size", 0) or 0) * max(int(config.get("grad_accum_steps", 1) or 1), 1)
    except (TypeError, ValueError, OverflowError):
        return MAX_EXAMPLES, "the task does not say"
    if epochs > 0:
        return min(epochs * registered, MAX_EXAMPLES), f"{epochs} local epochs x the {registered} examples it registered"
    if steps > 0 and batch > 0:
        if registered > steps * batch:
            return min(registered, MAX_EXAMPLES), f"the {registered} examples it registered"
        return min(steps * batch, MAX_EXAMPLES), f"{steps} local steps x batch size {batch}"
    return MAX_EXAMPLES, "the task does not say"


def _refusal(reply: ResultMessage) -> str | None:
    """Why the client sent no update (runtime/executor.py), or None if it sent one."""
    refused = reply.metrics.get("refused")
    return refused if isinstance(refused, str) and refused else None


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
