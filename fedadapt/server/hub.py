"""The connected clients of a coordinator, as a `Transport` the round engine drives.

The gRPC service (service.py) feeds it: `join` opens a session, `next_task` (or `next_task_async`, for the
asyncio service) waits on the session's queue for its long-lived PullTask stream, `admit` decides from an
upload's header alone whether its payload is wanted, and `submit` delivers the uploaded result. The engine
calls `run(tasks)`, which queues each task and returns once every asked client has answered or is gone, at
the deadline, or when the stragglers' grace is over. Nothing here knows gRPC, so it is tested with plain
threads.

Results are keyed by (run, round, client). The first answer per key stands: a valid one is ACCEPTED, an
invalid one (the engine's check, when the coordinator gave one: NaN, wrong shape, a refusal to train, an
example count the task does not allow) is REJECTED, and either settles the client's place in the round; a
second upload of the key is a DUPLICATE, one for a round that has closed is LATE (recorded, dropped). Every
other upload is REFUSED before its payload is read, with a code and a reason: no run or another run is
active, the client was not asked, the round is not open. One exception: after a coordinator restart, a
client retrying an upload for the round that was in flight (the next one to commit) is held and used when
that round asks for it.

Events (a client that failed to answer, a late answer) are tied to the run and round they belong to and
are drained by that run's next commit; at most one per (round, client, kind), so they stay bounded.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fedadapt.core.errors import PayloadError
from fedadapt.runtime.engine import ResultMessage, TaskMessage
from fedadapt.strategies.base import ClientInfo

log = logging.getLogger("fedadapt.server")

ACCEPTED, DUPLICATE, LATE, REJECTED, REFUSED = "accepted", "duplicate", "late", "rejected", "refused"
MAX_EVENTS_PER_CLIENT = 8  # late answers recorded per client between two commits; more are only counted

# an answer for the open round -> None, or PayloadError with the reason (the round engine's check)
Validator = Callable[[ResultMessage], None]


class Verdict(NamedTuple):
    """What the hub says about an upload: a status (module constants), the reason, and for a refusal its code
    and whether the same upload may be sent again later."""

    status: str
    reason: str = ""
    code: str = ""
    retry_after: float = 0.0


class TaskQueue:
    """A session's tasks: put from any thread, taken by a thread (`get`) or by a coroutine (`aget`)."""

    def __init__(self) -> None:
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None

    def put(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, fut = waiter
            loop.call_soon_threadsafe(_wake, fut)

    def get(self, timeout: float) -> Any:
        """The next item; raises TimeoutError if none comes within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._items:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self._cond.wait(left)
            return self._items.popleft()

    async def aget(self) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._items:
                    return self._items.popleft()
                fut = loop.create_future()
                self._waiter = (loop, fut)
            await fut

    def drain(self) -> None:
        """Drop queued tasks; an end-of-stream marker (None) stays."""
        with self._cond:
            ended = any(item is None for item in self._items)
            self._items.clear()
            if ended:
                self._items.append(None)


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass
class Session:
    name: str
    session_id: str
    capabilities: dict[str, Any]
    queue: TaskQueue = field(default_factory=TaskQueue)  # TaskMessage, or None to end the stream
    last_seen: float = field(default_factory=time.monotonic)
    streaming: bool = False
    closed: bool = False
    why_closed: str = ""

    @property
    def registered(self) -> int:
        """The examples this client said at Join that it holds (0: it did not say)."""
        n = self.capabilities.get("num_examples", 0)
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


@dataclass
class Event:
    """Something the round record should show besides the answers of the asked clients."""

    client: str
    round: int
    status: str  # late | failed
    reason: str
    bytes_up: int = 0
    run_id: str = ""


@dataclass
class _Round:
    run_id: str
    round: int
    tasks: dict[str, TaskMessage]
    results: dict[str, ResultMessage] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)
    checking: set[str] = field(default_factory=set)  # answers being validated (not yet filed)
    answered: dict[str, float] = field(default_factory=dict)  # seconds from the round's start to each answer
    started: float = field(default_factory=time.monotonic)

    def settled(self) -> bool:
        return not self.checking and len(self.results.keys() | self.gone) >= len(self.tasks)

    def missing(self) -> list[str]:
        return sorted(self.tasks.keys() - self.results.keys() - self.gone)


class ClientHub:
    """`straggler_factor` > 0: once `quorum` clients of a round have answered, the others get until
    max(straggler_factor x the median answer time, straggler_min_s) from the round's start; then the round
    returns without them and their answers are late. 0 (the default): a round waits for every asked client
    that is connected (or until the engine's round timeout)."""

    def __init__(self, heartbeat_timeout: float = 30.0, *, straggler_factor: float = 0.0,
                 straggler_min_s: float = 30.0):
        self.heartbeat_timeout = heartbeat_timeout
        self.straggler_factor = straggler_factor
        self.straggler_min_s = straggler_min_s
        self.run_id = ""
        self.run_spec_json = "{}"
        self.quorum = 1
        self.validator: Validator | None = None
        self.stats: Counter[str] = Counter()
        self._sessions: dict[str, Session] = {}  # by session id
        self._by_name: dict[str, Session] = {}
        self._expected = ""  # a run being loaded: its uploads for `_next_round` are held, not refused
        self._next_round = 1  # the round the active (or expected) run opens next
        self._round: _Round | None = None
        self._closed: dict[int, set[str]] = {}  # closed rounds of the active run -> clients whose answer it had
        self._early: dict[str, ResultMessage] = {}  # by client: answers for `_next_round`, before it opened
        self._events: dict[tuple, Event] = {}
        self._event_count: Counter[str] = Counter()  # per client, since the last drain
        self._waiting = ""
        self._aborted = False
        self._cond = threading.Condition()

    # ------------------------------------------------------------------ called by the service
    def join(self, name: str, capabilities: dict[str, Any]) -> Session:
        with self._cond:
            old = self._by_name.get(name)
            if old is not None:  # the same client reconnected: its old stream is dead or about to be
                self._close(old, "rejoined", mark_gone=False)
            s = Session(name, secrets.token_hex(16), capabilities)
            self._sessions[s.session_id] = s
            self._by_name[name] = s
            r = self._round
            if r is not None and name in r.tasks and name not in r.results and name not in r.checking:
                r.gone.discard(name)  # back within the round: its task is sent again
                s.queue.put(r.tasks[name])
            self._cond.notify_all()
            return s

    def session(self, session_id: str) -> Session | None:
        with self._cond:
            s = self._sessions.get(session_id)
            if s is not None:
                s.last_seen = time.monotonic()
            return s

    def attach(self, s: Session) -> None:
        with self._cond:
            if not s.closed:
                s.streaming = True
            self._cond.notify_all()

    def detach(self, s: Session) -> None:
        """The session's task stream ended: the client is gone (or will rejoin with a new session)."""
        with self._cond:
            self._close(s, "disconnected")

    def next_task(self, s: Session, timeout: float) -> TaskMessage | None:
        try:
            return s.queue.get(timeout=timeout)
        except TimeoutError:
            return None

    async def next_task_async(self, s: Session) -> TaskMessage | None:
        """The session's next task; None when its stream must end."""
        return await s.queue.aget()

    def heartbeat(self, session_id: str) -> bool:
        return self.session(session_id) is not None

    def revoke(self, name: str, why: str = "revoked") -> bool:
        """Close `name`'s session now (its task stream ends, the round stops waiting for it). True if it had one."""
        with self._cond:
            s = self._by_name.get(name)
            if s is None:
                return False
            self._close(s, why)
            return True

    def admit(self, s: Session, run_id: str, rnd: int) -> Verdict | None:
        """From an upload's header alone: None if its payload is wanted, else the verdict to answer at once."""
        with self._cond:
            return self._admit(s, run_id, rnd)

    def submit(self, s: Session, msg: ResultMessage, run_id: str) -> Verdict:
        """File an uploaded result; returns the verdict for the client. Runs the validator (if any) on an
        answer for the open round, outside the lock, before answering."""
        msg.registered = s.registered
        with self._cond:
            verdict = self._admit(s, run_id, msg.round, msg)
            if verdict is not None:
                return verdict
            r = self._round
            if r is None or r.round != msg.round:  # the next round, before it opened (a retry after a restart)
                self._early[s.name] = msg  # one per client, for one round: bounded
                return self._count(Verdict(ACCEPTED))
            r.checking.add(s.name)
            validator = self.validator
        reason = ""
        try:
            if validator is not None:
                validator(msg)
        except PayloadError as exc:
            reason = str(exc)
        finally:
            with self._cond:
                r.checking.discard(s.name)
                self._cond.notify_all()
        with self._cond:
            if self._round is not r:  # the round closed while the answer was checked
                return self._late(s.name, msg)
            r.results[s.name] = msg  # a rejected answer is filed too: it settles the client's place, and the
            r.answered[s.name] = time.monotonic() - r.started  # engine records it with its reason
            self._cond.notify_all()
        return self._count(Verdict(REJECTED, reason)) if reason else self._count(Verdict(ACCEPTED))

    # ------------------------------------------------------------------ the Transport
    def expect_run(self, run_id: str, next_round: int) -> None:
        """A run is about to start (its model is being built): uploads for its next round are held, not
        refused, so that clients retrying across a coordinator restart are not turned away."""
        with self._cond:
            if self.run_id != run_id:
                self._reset(run_id)
            self._expected, self._next_round = run_id, next_round

    def begin_run(self, run_id: str, run_spec_json: str, *, next_round: int | None = None, quorum: int = 1,
                  validator: Validator | None = None) -> None:
        with self._cond:
            if run_id not in (self.run_id, self._expected):
                self._reset(run_id)
            self.run_id, self.run_spec_json = run_id, run_spec_json
            self._expected = ""
            if next_round is not None:
                self._next_round = next_round
            self.quorum, self.validator = max(quorum, 1), validator
            self._aborted = False

    def end_run(self) -> None:
        """No run is active any more: uploads are refused until the next one begins."""
        with self._cond:
            self._reset("")

    def clients(self) -> list[ClientInfo]:
        with self._cond:
            self._expire()
            return [ClientInfo(s.name, s.registered, dict(s.capabilities)) for s in self._by_name.values()
                    if s.streaming]

    @property
    def round(self) -> int:
        """The round of the active run that is open, or else the next one to open (what a refusal is filed under)."""
        r = self._round
        return r.round if r is not None else self._next_round if (self.run_id or self._expected) else 0

    def connected(self) -> int:
        with self._cond:
            return sum(s.streaming for s in self._by_name.values())

    def waiting(self) -> str:
        """What the active run waits for now ("" when it waits for nothing)."""
        with self._cond:
            return self._waiting

    def wait_for_clients(self, n: int, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            try:
                while not self._aborted:
                    self._expire()
                    have = sum(s.streaming for s in self._by_name.values())
                    if have >= n:
                        return True
                    self._set_waiting(f"waiting for {n} client{'s' if n != 1 else ''}, {have} connected")
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cond.wait(timeout=1.0 if left is None else min(left, 1.0))
                return False
            finally:
                self._set_waiting("")

    def run(self, tasks: list[TaskMessage], *, timeout: float | None) -> list[ResultMessage]:
        if not tasks:
            return []
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            rnd = _Round(self.run_id, tasks[0].round, {t.client_id: t for t in tasks})
            self._round = rnd
            self._next_round = rnd.round + 1
            for name, early in list(self._early.items()):
                if early.round == rnd.round and name in rnd.tasks:
                    rnd.results[name] = early  # uploaded before a restart; no need to train again
                    rnd.answered[name] = 0.0
            self._early.clear()
            for t in tasks:
                s = self._by_name.get(t.client_id)
                if t.client_id in rnd.results:
                    continue
                if s is None or s.closed:
                    rnd.gone.add(t.client_id)
                    self._event(Event(t.client_id, rnd.round, "failed", "not connected"))
                else:
                    s.queue.put(t)
            why = "no result before the round deadline"
            logged = time.monotonic()
            while not rnd.settled() and not self._aborted:
                self._expire()
                now = time.monotonic()
                left = None if deadline is None else deadline - now
                grace = self._straggler_deadline(rnd)
                if grace is not None and (left is None or grace - now < left):
                    left, why = grace - now, self._grace_reason(rnd)
                if left is not None and left <= 0:
                    break
                missing = rnd.missing()
                self._set_waiting(f"round {rnd.round}: waiting for {len(missing)} of {len(rnd.tasks)} clients "
                                  f"({_names(missing)})")
                if now - logged > 10.0:
                    log.info("run %s %s", self.run_id, self._waiting)
                    logged = now
                self._cond.wait(timeout=1.0 if left is None else min(left, 1.0))
            for name in rnd.missing():
                self._event(Event(name, rnd.round, "failed", why))
            self._round = None
            self._set_waiting("")
            self._closed[rnd.round] = set(rnd.results)
            for old in [k for k in self._closed if k < rnd.round - 2]:
                del self._closed[old]  # older rounds: an upload for them is late whatever it was
            for s in self._by_name.values():  # tasks nobody picked up must not run after the round
                s.queue.drain()
            return [rnd.results[t.client_id] for t in tasks if t.client_id in rnd.results]

    def abort(self) -> None:
        """Make a waiting `run` / `wait_for_clients` return now (the run is being stopped)."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def drain_events(self, run_id: str | None = None) -> list[Event]:
        """The events of `run_id` (default: the active run) since the last drain."""
        with self._cond:
            run_id = self.run_id if run_id is None else run_id
            mine = [e for e in self._events.values() if e.run_id == run_id]
            self._events.clear()
            self._event_count.clear()
            return mine

    def record_event(self, event: Event) -> None:
        with self._cond:
            self._event(event)
            self.stats[event.status] += 1

    def shutdown(self) -> None:
        with self._cond:
            for s in list(self._sessions.values()):
                self._close(s, "coordinator shutting down")

    # ------------------------------------------------------------------ internals (hold the lock)
    def _admit(self, s: Session, run_id: str, rnd: int, msg: ResultMessage | None = None) -> Verdict | None:
        if s.closed:
            why = s.why_closed or "closed"
            return self._count(Verdict(REFUSED, f"session {why}; join again", "session-closed"))
        active = self.run_id if not self._expected else self._expected
        if not active:
            return self._count(Verdict(REFUSED, "no run is active on this coordinator", "no-active-run"))
        if run_id != active:
            return self._count(Verdict(REFUSED, f"run {run_id[:64]!r} is not the active run", "not-active-run"))
        r = self._round
        if r is not None and rnd == r.round:
            if s.name not in r.tasks:
                return self._count(Verdict(REFUSED, f"client {s.name!r} was not asked to train in round {r.round}",
                                           "not-asked"))
            if s.name in r.results or s.name in r.checking:
                return self._count(Verdict(DUPLICATE, "already received"))
            return None
        if rnd in self._closed and s.name in self._closed[rnd]:
            return self._count(Verdict(DUPLICATE, "already received"))
        if rnd < self._next_round:
            return self._late(s.name, msg, rnd)
        if r is None and rnd == self._next_round:
            held = self._early.get(s.name)
            if held is not None and held.round == rnd:  # the first upload per key stands
                return self._count(Verdict(DUPLICATE, "already received"))
            return None
        current = f"round {r.round} is open" if r is not None else f"the next round is {self._next_round}"
        return self._count(Verdict(REFUSED, f"round {rnd} is not open ({current})", "round-not-open"))

    def _late(self, name: str, msg: ResultMessage | None, rnd: int | None = None) -> Verdict:
        rnd = msg.round if msg is not None else rnd
        self._event(Event(name, rnd, LATE, "arrived after its round closed", len(msg.payload) if msg else 0))
        return self._count(Verdict(LATE, f"round {rnd} has closed"))

    def _event(self, event: Event) -> None:
        event.run_id = event.run_id or self.run_id
        key = (event.run_id, event.round, event.client, event.status)
        if key in self._events or self._event_count[event.client] >= MAX_EVENTS_PER_CLIENT:
            return
        self._event_count[event.client] += 1
        self._events[key] = event

    def _count(self, verdict: Verdict) -> Verdict:
        self.stats[verdict.status] += 1
        return verdict

    def _reset(self, run_id: str) -> None:
        self.run_id, self._expected = run_id, ""
        self.run_spec_json = "{}"
        self.validator = None
        self._next_round = 1
        self._round = None
        self._closed.clear()
        self._early.clear()
        self._events.clear()
        self._event_count.clear()
        self._aborted = False

    def _set_waiting(self, text: str) -> None:
        if text != self._waiting:
            self._waiting = text
            if text.startswith("waiting"):
                log.info("run %s %s", self.run_id or self._expected, text)

    def _straggler_deadline(self, rnd: _Round) -> float | None:
        if self.straggler_factor <= 0 or len(rnd.answered) < self.quorum:
            return None
        median = statistics.median(rnd.answered.values())
        return rnd.started + max(self.straggler_factor * median, self.straggler_min_s)

    def _grace_reason(self, rnd: _Round) -> str:
        median = statistics.median(rnd.answered.values())
        return (f"no result within the stragglers' grace ({self.straggler_factor:g} x the median answer time "
                f"{median:.1f}s, at least {self.straggler_min_s:g}s)")

    def _close(self, s: Session, why: str, mark_gone: bool = True) -> None:
        if s.closed:
            return
        s.closed, s.why_closed = True, why
        s.streaming = False
        s.queue.drain()  # a task it has not taken yet must not reach it
        s.queue.put(None)  # ends its stream if one is attached
        self._sessions.pop(s.session_id, None)
        if self._by_name.get(s.name) is s:
            del self._by_name[s.name]
        r = self._round
        if mark_gone and r is not None and s.name in r.tasks and s.name not in r.results:
            r.gone.add(s.name)
            self._event(Event(s.name, r.round, "failed", why))
        self._cond.notify_all()

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.heartbeat_timeout
        for s in list(self._sessions.values()):
            if s.last_seen < cutoff:
                self._close(s, "heartbeat timed out")


def _names(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
