"""The connected clients of a coordinator, as a `Transport` the round engine drives.

The gRPC service (service.py) feeds it: `join` opens a session, `next_task` blocks on the session's
queue for its long-lived PullTask stream, `submit` delivers an uploaded result. The engine calls
`run(tasks)`, which queues each task and returns once every asked client has answered or is gone, or
at the deadline. Nothing here knows gRPC, so it is tested with plain threads.

Results are keyed by (run, round, client): a second upload of the same key is a DUPLICATE, one for a
round that has closed is LATE (recorded, dropped), and one that arrives before its round opened (a
client retrying an upload across a coordinator restart) is held and used when the round asks for it.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fedadapt.runtime.engine import ResultMessage, TaskMessage
from fedadapt.strategies.base import ClientInfo

ACCEPTED, DUPLICATE, LATE, REJECTED = "accepted", "duplicate", "late", "rejected"


@dataclass
class Session:
    name: str
    session_id: str
    capabilities: dict[str, Any]
    queue: queue.Queue = field(default_factory=queue.Queue)  # TaskMessage, or None to end the stream
    last_seen: float = field(default_factory=time.monotonic)
    streaming: bool = False
    closed: bool = False


@dataclass
class Event:
    """Something the round record should show besides accepted/rejected results."""

    client: str
    round: int
    status: str  # late | failed | rejected | refused
    reason: str
    bytes_up: int = 0


@dataclass
class _Round:
    run_id: str
    round: int
    tasks: dict[str, TaskMessage]
    results: dict[str, ResultMessage] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)

    def settled(self) -> bool:
        return len(self.results) + len(self.gone - set(self.results)) >= len(self.tasks)


class ClientHub:
    def __init__(self, heartbeat_timeout: float = 30.0):
        self.heartbeat_timeout = heartbeat_timeout
        self.run_id = ""
        self.run_spec_json = "{}"
        self.stats: Counter[str] = Counter()
        self._sessions: dict[str, Session] = {}  # by session id
        self._by_name: dict[str, Session] = {}
        self._round: _Round | None = None
        self._closed_round: tuple[str, int, set[str]] | None = None  # (run, round, clients received)
        self._early: dict[str, ResultMessage] = {}  # by client: results for a round not yet open
        self._events: list[Event] = []
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
            if r is not None and name in r.tasks and name not in r.results:
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
            s.streaming = True
            self._cond.notify_all()

    def detach(self, s: Session) -> None:
        """The session's task stream ended: the client is gone (or will rejoin with a new session)."""
        with self._cond:
            self._close(s, "disconnected")

    def next_task(self, s: Session, timeout: float) -> TaskMessage | None:
        try:
            return s.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def heartbeat(self, session_id: str) -> bool:
        return self.session(session_id) is not None

    def submit(self, s: Session, msg: ResultMessage, run_id: str) -> tuple[str, str]:
        """File an uploaded result; returns (status, reason) for the client."""
        with self._cond:
            r = self._round
            if run_id != self.run_id:
                return self._count(LATE, f"run {run_id!r} is not the active run")
            if r is not None and msg.round == r.round:
                if s.name not in r.tasks:
                    return self._count(REJECTED, f"client {s.name!r} was not asked to train in round {r.round}")
                if s.name in r.results:
                    return self._count(DUPLICATE, "already received")
                r.results[s.name] = msg
                self._cond.notify_all()
                return ACCEPTED, ""
            closed = self._closed_round
            if closed is not None and (closed[0], closed[1]) == (run_id, msg.round) and s.name in closed[2]:
                return self._count(DUPLICATE, "already received")
            last_closed = closed[1] if closed and closed[0] == run_id else 0
            if msg.round <= last_closed or (r is not None and msg.round < r.round):
                self._events.append(Event(s.name, msg.round, LATE, "arrived after its round closed",
                                          len(msg.payload)))
                return self._count(LATE, f"round {msg.round} has closed")
            held = self._early.get(s.name)
            if held is not None and held.round == msg.round:  # the first upload per key stands
                return self._count(DUPLICATE, "already received")
            self._early[s.name] = msg  # held until its round opens (one per client: bounded)
            return ACCEPTED, ""

    # ------------------------------------------------------------------ the Transport
    def begin_run(self, run_id: str, run_spec_json: str) -> None:
        with self._cond:
            self.run_id, self.run_spec_json = run_id, run_spec_json
            self._early.clear()
            self._closed_round = None
            self._aborted = False

    def clients(self) -> list[ClientInfo]:
        with self._cond:
            self._expire()
            return [ClientInfo(s.name, int(s.capabilities.get("num_examples", 0) or 0), dict(s.capabilities))
                    for s in self._by_name.values() if s.streaming]

    def wait_for_clients(self, n: int, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._aborted:
                self._expire()
                if sum(s.streaming for s in self._by_name.values()) >= n:
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(timeout=1.0 if left is None else min(left, 1.0))
            return False

    def run(self, tasks: list[TaskMessage], *, timeout: float | None) -> list[ResultMessage]:
        if not tasks:
            return []
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            rnd = _Round(self.run_id, tasks[0].round, {t.client_id: t for t in tasks})
            self._round = rnd
            for name, early in list(self._early.items()):
                if early.round == rnd.round and name in rnd.tasks:
                    rnd.results[name] = early  # uploaded before a restart; no need to train again
                del self._early[name]
            for t in tasks:
                s = self._by_name.get(t.client_id)
                if t.client_id in rnd.results:
                    continue
                if s is None or s.closed:
                    rnd.gone.add(t.client_id)
                    self._events.append(Event(t.client_id, rnd.round, "failed", "not connected"))
                else:
                    s.queue.put(t)
            while not rnd.settled() and not self._aborted:
                self._expire()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(timeout=1.0 if left is None else min(left, 1.0))
            for name in rnd.tasks.keys() - rnd.results.keys() - rnd.gone:
                self._events.append(Event(name, rnd.round, "failed", "no result before the round deadline"))
            self._round = None
            self._closed_round = (rnd.run_id, rnd.round, set(rnd.results))
            for s in self._by_name.values():  # tasks nobody picked up must not run after the round
                _drain(s.queue)
            return [rnd.results[t.client_id] for t in tasks if t.client_id in rnd.results]

    def abort(self) -> None:
        """Make a waiting `run` / `wait_for_clients` return now (the run is being stopped)."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def drain_events(self) -> list[Event]:
        with self._cond:
            events, self._events = self._events, []
            return events

    def record_event(self, event: Event) -> None:
        with self._cond:
            self._events.append(event)
            self.stats[event.status] += 1

    def shutdown(self) -> None:
        with self._cond:
            for s in list(self._sessions.values()):
                self._close(s, "coordinator shutting down")

    # ------------------------------------------------------------------ internals (hold the lock)
    def _count(self, status: str, reason: str) -> tuple[str, str]:
        self.stats[status] += 1
        return status, reason

    def _close(self, s: Session, why: str, mark_gone: bool = True) -> None:
        if s.closed:
            return
        s.closed = True
        s.streaming = False
        s.queue.put(None)  # ends its stream if one is attached
        self._sessions.pop(s.session_id, None)
        if self._by_name.get(s.name) is s:
            del self._by_name[s.name]
        r = self._round
        if mark_gone and r is not None and s.name in r.tasks and s.name not in r.results:
            r.gone.add(s.name)
            self._events.append(Event(s.name, r.round, "failed", why))
        self._cond.notify_all()

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.heartbeat_timeout
        for s in list(self._sessions.values()):
            if s.last_seen < cutoff:
                self._close(s, "heartbeat timed out")


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            item = q.get_nowait()
        except queue.Empty:
            return
        if item is None:
            q.put(None)
            return
