"""ClientHub (fedadapt/server/hub.py) with plain threads, no gRPC: the service's calls (join, attach,
next_task, submit, detach, heartbeat) on one side, the engine's `run` on the other. Every wait is
bounded so a hub that never settles fails the test instead of hanging it."""

from __future__ import annotations

import threading
import time

import pytest

from fedadapt.runtime.engine import ResultMessage, TaskMessage
from fedadapt.server.hub import ACCEPTED, DUPLICATE, LATE, REFUSED, ClientHub, Session

RUN = "run-1"
BOUND = 10.0  # no single wait in these tests may take longer


def task(client: str, rnd: int, payload: bytes = b"global") -> TaskMessage:
    return TaskMessage(client, rnd, "train", {"seed": rnd}, payload)


def result(client: str, rnd: int, payload: bytes | None = None, n: int = 5) -> ResultMessage:
    return ResultMessage(client, rnd, n, {"loss": 1.0}, payload if payload is not None else f"{client}@{rnd}".encode())


class RoundThread:
    """`hub.run(tasks)` in the background, as the engine calls it."""

    def __init__(self, hub: ClientHub, tasks: list[TaskMessage], timeout: float | None = None):
        self.out: list[ResultMessage] | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.elapsed: float | None = None

        def body():
            try:
                self.out = hub.run(tasks, timeout=timeout)
            except BaseException as exc:  # surfaced by join()
                self.error = exc
            self.elapsed = time.monotonic() - self.started

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()

    def done(self) -> bool:
        return not self.thread.is_alive()

    def join(self, timeout: float = BOUND) -> list[ResultMessage]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"hub.run did not return within {timeout}s"
        if self.error is not None:
            raise self.error
        assert self.out is not None
        return self.out


def connect(hub: ClientHub, name: str, **caps) -> Session:
    s = hub.join(name, {"num_examples": 10, **caps})
    hub.attach(s)
    return s


def take(hub: ClientHub, s: Session, timeout: float = BOUND) -> TaskMessage:
    t = hub.next_task(s, timeout=timeout)
    assert t is not None, f"{s.name} got no task within {timeout}s"
    return t


def nothing_queued(hub: ClientHub, s: Session) -> bool:
    return hub.next_task(s, timeout=0.2) is None


def wait_until(predicate, timeout: float = BOUND) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture
def hub():
    h = ClientHub(heartbeat_timeout=60.0)
    h.begin_run(RUN, '{"spec": 1}')
    yield h
    h.abort()  # never leave a background run waiting
    h.shutdown()


# --------------------------------------------------------------------------- sessions
def test_join_and_attach_make_a_client_available(hub):
    s = hub.join("a", {"num_examples": 7, "max_rank": 8})
    assert hub.clients() == []  # joined but no task stream yet
    assert hub.session(s.session_id) is s and hub.heartbeat(s.session_id)
    hub.attach(s)
    [info] = hub.clients()
    assert (info.client_id, info.num_examples, info.capabilities["max_rank"]) == ("a", 7, 8)
    assert hub.wait_for_clients(1, timeout=0.1)
    assert not hub.wait_for_clients(2, timeout=0.1)


def test_wait_for_clients_wakes_when_enough_join(hub):
    connect(hub, "a")
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(hub.wait_for_clients(2, timeout=BOUND)), daemon=True)
    t.start()
    time.sleep(0.1)
    assert t.is_alive()
    connect(hub, "b")
    t.join(BOUND)
    assert got == [True]


def test_detach_removes_the_client(hub):
    s = connect(hub, "a")
    hub.detach(s)
    assert s.closed and hub.clients() == [] and hub.session(s.session_id) is None
    assert not hub.heartbeat(s.session_id)
    assert hub.next_task(s, timeout=BOUND) is None  # the end-of-stream marker, not a wait


# --------------------------------------------------------------------------- rounds
def test_a_round_returns_when_every_asked_client_answers(hub):
    sa, sb, sc = connect(hub, "a"), connect(hub, "b"), connect(hub, "c")
    r = RoundThread(hub, [task("a", 1), task("b", 1)])  # c is not asked
    ta, tb = take(hub, sa), take(hub, sb)
    assert (ta.client_id, ta.round, tb.client_id) == ("a", 1, "b")
    assert nothing_queued(hub, sc)
    assert hub.submit(sb, result("b", 1), RUN)[:2] == (ACCEPTED, "")
    time.sleep(0.2)
    assert not r.done()  # still waiting for a
    assert hub.submit(sa, result("a", 1), RUN)[:2] == (ACCEPTED, "")
    out = r.join()
    assert r.elapsed < 5
    assert [m.client_id for m in out] == ["a", "b"]  # in task order, not arrival order
    assert [m.payload for m in out] == [b"a@1", b"b@1"]
    assert hub.drain_events() == []


def test_a_client_not_asked_is_refused(hub):
    sa, sc = connect(hub, "a"), connect(hub, "c")
    r = RoundThread(hub, [task("a", 1)])
    take(hub, sa)
    assert hub.admit(sc, RUN, 1).code == "not-asked"  # from the header alone, before any payload
    status, reason = hub.submit(sc, result("c", 1), RUN)[:2]
    assert status == REFUSED and "not asked" in reason
    hub.submit(sa, result("a", 1), RUN)
    assert [m.client_id for m in r.join()] == ["a"]


def test_a_result_for_another_run_is_refused(hub):
    sa = connect(hub, "a")
    r = RoundThread(hub, [task("a", 1)])
    take(hub, sa)
    status, reason = hub.submit(sa, result("a", 1), "some-other-run")[:2]
    assert status == REFUSED and "not the active run" in reason
    hub.submit(sa, result("a", 1), RUN)
    assert len(r.join()) == 1


def test_a_session_closed_mid_round_settles_it_without_its_result(hub):
    sa, sb = connect(hub, "a"), connect(hub, "b")
    r = RoundThread(hub, [task("a", 1), task("b", 1)])  # no timeout: only the detach can end it
    take(hub, sa), take(hub, sb)
    hub.submit(sa, result("a", 1), RUN)
    time.sleep(0.1)
    assert not r.done()
    hub.detach(sb)  # b's stream ended
    out = r.join(timeout=3)
    assert [m.client_id for m in out] == ["a"]
    [ev] = hub.drain_events()
    assert (ev.client, ev.round, ev.status, ev.reason) == ("b", 1, "failed", "disconnected")
    assert hub.drain_events() == []  # drained


def test_a_client_not_connected_is_failed_at_once(hub):
    sa = connect(hub, "a")
    r = RoundThread(hub, [task("a", 1), task("ghost", 1)])
    take(hub, sa)
    hub.submit(sa, result("a", 1), RUN)
    assert [m.client_id for m in r.join(timeout=3)] == ["a"]
    [ev] = hub.drain_events()
    assert (ev.client, ev.status, ev.reason) == ("ghost", "failed", "not connected")


def test_a_rejoin_during_the_round_resends_the_task_to_the_new_session(hub):
    sa, sb = connect(hub, "a"), connect(hub, "b")
    r = RoundThread(hub, [task("a", 1, b"model-1"), task("b", 1, b"model-1")])
    take(hub, sa), take(hub, sb)
    sa2 = connect(hub, "a")  # a reconnected (its old stream is dead) while training
    assert sa.closed and not sa2.closed and sa2.session_id != sa.session_id
    assert hub.next_task(sa, timeout=BOUND) is None  # the old stream is told to end
    again = take(hub, sa2)
    assert (again.client_id, again.round, again.payload) == ("a", 1, b"model-1")
    time.sleep(0.1)
    assert not r.done()  # a rejoin is not a departure
    assert hub.submit(sa2, result("a", 1), RUN)[:2] == (ACCEPTED, "")
    hub.submit(sb, result("b", 1), RUN)
    assert [m.client_id for m in r.join()] == ["a", "b"]
    assert hub.drain_events() == []


def test_a_client_that_left_and_rejoins_within_the_round_gets_its_task_again(hub):
    sa, sb = connect(hub, "a"), connect(hub, "b")
    r = RoundThread(hub, [task("a", 1), task("b", 1)])
    take(hub, sa), take(hub, sb)
    hub.detach(sa)  # gone: the round now waits only for b
    sa2 = connect(hub, "a")  # but back before b answered
    assert take(hub, sa2).round == 1
    hub.submit(sb, result("b", 1), RUN)
    time.sleep(0.2)
    assert not r.done()  # a is expected again
    hub.submit(sa2, result("a", 1), RUN)
    assert [m.client_id for m in r.join()] == ["a", "b"]


def test_a_result_for_a_closed_round_is_late_and_recorded(hub):
    sa, sb = connect(hub, "a"), connect(hub, "b")
    r = RoundThread(hub, [task("a", 1), task("b", 1)], timeout=0.3)
    take(hub, sa), take(hub, sb)
    hub.submit(sa, result("a", 1), RUN)
    assert [m.client_id for m in r.join()] == ["a"]
    assert [(e.client, e.status) for e in hub.drain_events()] == [("b", "failed")]
    status, reason = hub.submit(sb, result("b", 1, b"x" * 123), RUN)[:2]
    assert status == LATE and "closed" in reason
    [ev] = hub.drain_events()
    assert (ev.client, ev.round, ev.status, ev.bytes_up) == ("b", 1, LATE, 123)
    assert hub.stats[LATE] == 1


def test_a_result_for_an_older_round_is_late(hub):
    sa = connect(hub, "a")
    for rnd in (1, 2):
        r = RoundThread(hub, [task("a", rnd)])
        take(hub, sa)
        hub.submit(sa, result("a", rnd), RUN)
        r.join()
    r = RoundThread(hub, [task("a", 3)])
    take(hub, sa)
    assert hub.submit(sa, result("a", 1), RUN)[0] == DUPLICATE  # a answered round 1: a replay, two rounds back
    sb = connect(hub, "b")
    assert hub.submit(sb, result("b", 1), RUN)[0] == LATE  # b never answered it: late, with round 3 open
    hub.submit(sa, result("a", 3), RUN)
    assert [m.round for m in r.join()] == [3]


def test_a_second_result_for_the_same_key_is_a_duplicate(hub):
    sa, sb = connect(hub, "a"), connect(hub, "b")
    r = RoundThread(hub, [task("a", 1), task("b", 1)])
    take(hub, sa), take(hub, sb)
    assert hub.submit(sa, result("a", 1, b"first"), RUN)[:2] == (ACCEPTED, "")
    assert hub.submit(sa, result("a", 1, b"second"), RUN)[0] == DUPLICATE  # within the round
    hub.submit(sb, result("b", 1), RUN)
    out = r.join()
    assert {m.client_id: m.payload for m in out}["a"] == b"first"  # the first one is kept
    # and after the round closed: a replay is a duplicate, not a late result
    assert hub.submit(sa, result("a", 1, b"third"), RUN)[0] == DUPLICATE
    assert hub.stats[DUPLICATE] == 2
    assert hub.drain_events() == []


def test_an_early_result_is_used_when_its_round_asks_for_it(hub):
    sa, sb = connect(hub, "a"), connect(hub, "b")
    # a uploads for round 1 before the round opened (a retry across a coordinator restart)
    assert hub.submit(sa, result("a", 1, b"kept"), RUN)[:2] == (ACCEPTED, "")
    r = RoundThread(hub, [task("a", 1), task("b", 1)])
    take(hub, sb)
    assert nothing_queued(hub, sa)  # a is not asked to train again
    hub.submit(sb, result("b", 1), RUN)
    out = r.join()
    assert {m.client_id: m.payload for m in out} == {"a": b"kept", "b": b"b@1"}
    assert hub.submit(sa, result("a", 1), RUN)[0] == DUPLICATE


def test_an_early_result_for_a_round_after_the_next_is_refused(hub):
    sa = connect(hub, "a")
    status, reason, code, _ = hub.submit(sa, result("a", 2, b"too early"), RUN)
    assert (status, code) == (REFUSED, "round-not-open") and "round 2 is not open" in reason  # not held in memory
    r = RoundThread(hub, [task("a", 1)])
    take(hub, sa)  # round 1 asks a: nothing answers it but a's round-1 result
    hub.submit(sa, result("a", 1), RUN)
    assert [m.round for m in r.join()] == [1]
    r = RoundThread(hub, [task("a", 2)])
    take(hub, sa)
    hub.submit(sa, result("a", 2, b"fresh"), RUN)
    assert [m.payload for m in r.join()] == [b"fresh"]


def test_an_early_result_is_dropped_by_a_new_run(hub):
    sa = connect(hub, "a")
    hub.submit(sa, result("a", 1, b"old run"), RUN)
    hub.begin_run("run-2", "{}")
    r = RoundThread(hub, [task("a", 1)])
    take(hub, sa)
    hub.submit(sa, result("a", 1, b"new run"), "run-2")
    assert [m.payload for m in r.join()] == [b"new run"]


def test_a_second_early_result_for_the_same_key_is_a_duplicate(hub):
    """The hub keeps the first upload per (run, round, client): a replay before the round opens must
    not replace it (a hostile client could otherwise swap its held result at will)."""
    sa = connect(hub, "a")
    assert hub.submit(sa, result("a", 1, b"first"), RUN)[:2] == (ACCEPTED, "")
    assert hub.submit(sa, result("a", 1, b"second"), RUN)[0] == DUPLICATE
    r = RoundThread(hub, [task("a", 1)])
    assert [m.payload for m in r.join()] == [b"first"]


def test_round_timeout_returns_at_the_deadline_with_the_results_so_far(hub):
    sa, sb, sc = connect(hub, "a"), connect(hub, "b"), connect(hub, "c")
    r = RoundThread(hub, [task("a", 1), task("b", 1), task("c", 1)], timeout=0.6)
    take(hub, sa), take(hub, sb), take(hub, sc)
    hub.submit(sc, result("c", 1), RUN)
    out = r.join(timeout=5)
    assert 0.55 <= r.elapsed < 2.5, r.elapsed
    assert [m.client_id for m in out] == ["c"]
    events = hub.drain_events()
    assert sorted((e.client, e.status) for e in events) == [("a", "failed"), ("b", "failed")]
    assert all("deadline" in e.reason for e in events)


def test_tasks_nobody_picked_up_do_not_outlive_their_round(hub):
    sa, sb = connect(hub, "a"), connect(hub, "b")
    r = RoundThread(hub, [task("a", 1), task("b", 1)], timeout=0.3)
    take(hub, sa)  # b never reads its task
    hub.submit(sa, result("a", 1), RUN)
    r.join()
    assert nothing_queued(hub, sb)  # round 1's task must not reach b after the round


def test_abort_makes_run_and_wait_for_clients_return(hub):
    sa = connect(hub, "a")
    r = RoundThread(hub, [task("a", 1)])  # no timeout, and a never answers
    take(hub, sa)
    waited: list[bool] = []
    w = threading.Thread(target=lambda: waited.append(hub.wait_for_clients(5)), daemon=True)  # no timeout
    w.start()
    time.sleep(0.2)
    assert not r.done() and w.is_alive()
    t0 = time.monotonic()
    hub.abort()
    assert r.join(timeout=3) == []
    w.join(3)
    assert not w.is_alive() and waited == [False]
    assert time.monotonic() - t0 < 2.5


def test_begin_run_clears_an_abort(hub):
    hub.abort()
    hub.begin_run("run-2", "{}")
    sa = connect(hub, "a")
    r = RoundThread(hub, [task("a", 1)])
    take(hub, sa)
    time.sleep(0.2)
    assert not r.done()  # a fresh run waits again
    hub.submit(sa, result("a", 1), "run-2")
    assert len(r.join()) == 1


def test_heartbeat_expiry_closes_a_silent_session():
    hub = ClientHub(heartbeat_timeout=0.4)
    hub.begin_run(RUN, "{}")
    try:
        quiet, alive = connect(hub, "quiet"), connect(hub, "alive")
        stop = threading.Event()

        def beat():
            while not stop.wait(0.05):
                hub.heartbeat(alive.session_id)

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        r = RoundThread(hub, [task("quiet", 1), task("alive", 1)])  # no round timeout
        take(hub, quiet), take(hub, alive)
        wait_until(lambda: quiet.closed, timeout=5)
        assert not alive.closed
        assert not hub.heartbeat(quiet.session_id) and hub.session(quiet.session_id) is None
        assert [c.client_id for c in hub.clients()] == ["alive"]
        hub.submit(alive, result("alive", 1), RUN)
        assert [m.client_id for m in r.join(timeout=5)] == ["alive"]
        events = hub.drain_events()
        assert [(e.client, e.status, e.reason) for e in events] == [("quiet", "failed", "heartbeat timed out")]
        stop.set()
        beater.join(BOUND)
    finally:
        hub.abort()
        hub.shutdown()


def test_shutdown_ends_every_stream(hub):
    sa, sb = connect(hub, "a"), connect(hub, "b")
    hub.shutdown()
    assert sa.closed and sb.closed
    assert hub.next_task(sa, timeout=BOUND) is None and hub.next_task(sb, timeout=BOUND) is None
    assert hub.clients() == []
