"""Coordinator hardening (issue #20): one regression test per numbered finding, each against a coordinator
served in this process on 127.0.0.1 (the same `serve`, hub, run manager, store and registry that
`fedadapt server start` wires together), with clients that speak raw gRPC. Runs are a tiny MLP on
synthetic data, so a round takes milliseconds; every wait is bounded.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import pytest
import torch
from safetensors.torch import save as st_save

from fedadapt.core import codec
from fedadapt.core.errors import PayloadError
from fedadapt.proto import fedadapt_pb2 as pb
from fedadapt.proto import fedadapt_pb2_grpc as pb_grpc
from fedadapt.proto.auth import NAME_KEY, TOKEN_KEY
from fedadapt.proto.chunks import Reassembler, describe, framed, framed_upload, pull_task, push_result
from fedadapt.runtime.engine import ResultMessage, TaskMessage, examples_allowed
from fedadapt.server.hub import ACCEPTED, LATE, ClientHub
from fedadapt.server.registry import Registry
from fedadapt.server.runs import RunManager
from fedadapt.server.service import Limits, _json_object, serve
from fedadapt.server.store import Store
from fedadapt.server.telemetry import RefusalLog, Stats, serve_metrics

S = pb.PushReply
WAIT = 30.0  # bound on any single wait
TOKENS = {name: f"token-of-{name}-0123456789abcdef" for name in ("a", "b", "c", "m")}


def run_toml(rounds: int = 1, clients: int = 2, min_results: int = 1, extra: str = "") -> str:
    return f"""
name = "hardening"
seed = 1
rounds = {rounds}
clients_per_round = {clients}
[model]
source = "mlp"
hidden = [4]
[adapter]
kind = "full"
[data]
dataset = "synthetic"
partition = "iid"
num_clients = {clients}
num_examples = 64
[train]
lr = 0.05
local_steps = 1
batch_size = 8
[eval]
every = 100000
max_examples = 8
[coordinator]
min_clients = {clients}
min_results = {min_results}
{extra}
"""


@dataclass
class Coordinator:
    store: Store
    hub: ClientHub
    manager: RunManager
    refusals: RefusalLog
    stats: Stats
    registry: Registry
    port: int

    def client(self, name: str, token: str | None = None) -> Client:
        return Client(self.port, name, TOKENS.get(name, "x") if token is None else token)

    def control(self):
        return pb_grpc.ControlStub(grpc.insecure_channel(f"127.0.0.1:{self.port}"))

    def wait_status(self, run_id: str, statuses=("finished", "failed", "stopped"), timeout: float = WAIT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.store.get_run(run_id)
            if row.status in statuses:
                return row
            time.sleep(0.02)
        raise AssertionError(f"run {run_id} is still {self.store.get_run(run_id).status} after {timeout}s")

    def wait_committed(self, run_id: str, rnd: int, timeout: float = WAIT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = dict(self.store.records(run_id))
            if rnd in records:
                return records[rnd]
            time.sleep(0.02)
        raise AssertionError(f"round {rnd} of {run_id} not committed within {timeout}s "
                             f"(waiting: {self.hub.waiting()!r})")

    def refused_rows(self, run_id: str | None = None, at_least: int = 1, timeout: float = 10.0):
        """The store's refusals once at least `at_least` refusals are written (the log writes every 0.05 s)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.store.refusals(run_id)
            if sum(r.count for r in rows) >= at_least or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)


@contextmanager
def coordinator(tmp_path, *, hub: ClientHub | None = None, limits: Limits | None = None, metrics: bool = False):
    store = Store(f"sqlite:///{tmp_path / 'coord.db'}", tmp_path / "blobs")
    registered = store.registry()
    for name, token in TOKENS.items():
        if name not in registered:
            store.add_client(name, token)
    stats = Stats()
    refusals = RefusalLog(store, stats, flush_s=0.05)
    hub = hub or ClientHub()
    registry = Registry(store, refresh_s=0.1, touch_s=0.1, on_revoked=lambda name, why: hub.revoke(name, why))
    manager = RunManager(store, hub, refusals=refusals)
    server, port = serve("127.0.0.1:0", hub, manager, authenticate=registry, max_payload_bytes=2**20,
                         limits=limits, refusals=refusals, stats=stats, seen=registry.seen)
    manager.start()
    c = Coordinator(store, hub, manager, refusals, stats, registry, port)
    try:
        yield c
    finally:
        manager.close()
        hub.shutdown()
        server.stop(grace=0.5).wait()
        registry.close()
        refusals.close()
        store.close()


class Client:
    """A client that speaks raw gRPC: join, a task stream read on a background thread, heartbeats, uploads."""

    def __init__(self, port: int, name: str, token: str):
        self.name = name
        self.md = ((NAME_KEY, name), (TOKEN_KEY, token))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.session = ""
        self.tasks: queue.Queue = queue.Queue()
        self.stream = None
        self._stop = threading.Event()

    def join(self, caps: dict | str | None = None) -> pb.JoinReply:
        text = caps if isinstance(caps, str) else json.dumps({"num_examples": 32} if caps is None else caps)
        reply = self.stub.Join(pb.JoinRequest(capabilities_json=text), metadata=self.md, timeout=WAIT)
        self.session = reply.session
        return reply

    def open_stream(self, heartbeat: bool = True) -> None:
        self.stream = pull_task(self.channel)(pb.PullRequest(session=self.session), metadata=self.md)
        stream, tasks = self.stream, self.tasks

        def read():
            try:
                parts = iter(stream)
                for part in parts:
                    buf = Reassembler(part.header.payload, 2**24)
                    buf.add(part.chunk)
                    while not buf.complete:
                        buf.add(next(parts).chunk)
                    tasks.put((part.header, bytes(buf.result())))
                tasks.put(None)
            except grpc.RpcError as exc:
                tasks.put(exc)

        def beat():
            while not self._stop.wait(0.3):
                try:
                    self.stub.Heartbeat(pb.HeartbeatRequest(session=self.session), metadata=self.md, timeout=5)
                except grpc.RpcError:
                    pass

        threading.Thread(target=read, daemon=True).start()
        if heartbeat:
            threading.Thread(target=beat, daemon=True).start()

    def connect(self, caps=None) -> Client:
        self.join(caps)
        self.open_stream()
        return self

    def next_task(self, timeout: float = WAIT):
        item = self.tasks.get(timeout=timeout)
        assert item is not None and not isinstance(item, grpc.RpcError), f"{self.name}'s stream ended: {item!r}"
        return item

    def push(self, header: pb.TaskHeader, payload: bytes, *, num_examples: int = 32, metrics: dict | str | None = None,
             rnd: int | None = None, run_id: str | None = None, trailer: bool = False) -> pb.PushReply:
        h = pb.ResultHeader(session=self.session, run_id=header.run_id if run_id is None else run_id,
                            round=header.round if rnd is None else rnd, num_examples=num_examples,
                            metrics_json=metrics if isinstance(metrics, str) else json.dumps(metrics or {"loss": 1.0}))
        if trailer:
            parts = framed_upload(h, payload)
        else:
            h.payload.CopyFrom(describe(payload))
            parts = framed(pb.ResultPart, h, payload)
        return push_result(self.channel)(parts, metadata=self.md, timeout=WAIT)

    def echo(self, header: pb.TaskHeader, payload: bytes, **kw) -> pb.PushReply:
        """A valid answer: the global tensors back."""
        return self.push(header, payload, **kw)

    def close(self) -> None:
        self._stop.set()
        if self.stream is not None:
            self.stream.cancel()
        self.channel.close()


@pytest.fixture
def clients():
    made: list[Client] = []

    def track(c: Client) -> Client:
        made.append(c)
        return c

    yield track
    for c in made:
        c.close()


def submit(coord: Coordinator, toml: str) -> str:
    return coord.manager.submit(toml).run_id


def status(reply: pb.PushReply) -> str:
    return S.Status.Name(reply.status)


# ------------------------------------------------------------------------------------------------- 1
def test_01_refusals_while_no_run_is_active_are_not_filed_into_the_next_run(tmp_path, clients):
    """Was: a rejection that came while no run was active went into the hub's one event list and was filed
    into the next run's round 1; the list grew without bound."""
    with coordinator(tmp_path) as coord:
        m = clients(coord.client("m")).connect()
        for _ in range(50):  # truncated uploads while no run is active
            h = pb.ResultHeader(session=m.session, run_id="run-none", round=1, num_examples=1, metrics_json="{}",
                                payload=pb.Payload(size=100, sha256=b"\0" * 32))
            reply = push_result(m.channel)(iter([pb.ResultPart(header=h, chunk=b"x" * 10)]), metadata=m.md, timeout=WAIT)
            assert status(reply) == "REFUSED" and reply.code == "no-active-run", reply
        assert not coord.hub._events  # nothing held for a future run
        a, b = clients(coord.client("a")).connect(), clients(coord.client("b")).connect()
        m.close()
        run_id = submit(coord, run_toml())
        for c in (a, b):
            header, payload = c.next_task()
            assert status(c.echo(header, payload)) == "ACCEPTED"
        record = coord.wait_committed(run_id, 1)
        assert not record["events"] and record["refused"] == {}, record
        assert {p.client for p in coord.store.participations(run_id, 1)} == {"a", "b"}
        rows = coord.refused_rows("", at_least=50)  # recorded, under no run
        assert sum(r.count for r in rows if r.code == "no-active-run") == 50 and all(r.status == "refused" for r in rows)


# ------------------------------------------------------------------------------------------------- 2
def test_02_parallel_uploads_of_one_client_are_bounded(tmp_path, clients):
    """Was: one authenticated client could open any number of parallel uploads (RSS 300 -> 1516 MB)."""
    limits = Limits(2**20, idle_s=2.0, uploads_per_client=2)
    with coordinator(tmp_path, limits=limits) as coord:
        a, b = clients(coord.client("a")).connect(), clients(coord.client("b")).connect()
        run_id = submit(coord, run_toml())
        header, payload = a.next_task()
        big = bytes(600_000)
        stalled, gate = [], threading.Event()

        def stalling():  # the header and one chunk of 3 announced, then nothing until the gate opens
            h = pb.ResultHeader(session=a.session, run_id=header.run_id, round=header.round, num_examples=8,
                                metrics_json="{}", payload=describe(big))
            yield pb.ResultPart(header=h, chunk=big[:200_000])
            gate.wait(WAIT)

        for _ in range(6):
            stalled.append(push_result(a.channel).future(stalling(), metadata=a.md, timeout=WAIT))
        t0 = time.monotonic()
        replies = [f.result(timeout=WAIT) for f in stalled]
        gate.set()
        codes = sorted(r.code for r in replies)
        assert codes.count("busy-client") == 4, codes  # refused at once, with a time to retry after
        assert all(r.retry_after_s > 0 for r in replies if r.code == "busy-client")
        assert codes.count("idle") == 2, codes  # the two admitted ones, cut off by the idle limit
        assert time.monotonic() - t0 < limits.idle_s + 5
        assert status(a.echo(header, payload)) == "ACCEPTED"  # the client's own answer still goes through
        header, payload = b.next_task()
        b.echo(header, payload)
        coord.wait_committed(run_id, 1)
        rows = coord.refused_rows(run_id, at_least=6)
        assert {r.code for r in rows} == {"busy-client", "idle"}


# ------------------------------------------------------------------------------------------------- 3
def test_03_unauthenticated_streams_are_answered_before_any_message(tmp_path, clients):
    """Was: PushResult read its first message before authenticating, so silent unauthenticated streams held
    worker threads until legitimate clients were no longer served."""
    with coordinator(tmp_path) as coord:
        # four connections of 25 streams (a connection has at most 32 streams open)
        channels = [grpc.insecure_channel(f"127.0.0.1:{coord.port}", options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(4)]
        gate = threading.Event()

        def silent():
            gate.wait(WAIT)
            return
            yield

        calls = [push_result(ch).future(silent(), metadata=((NAME_KEY, "eve"), (TOKEN_KEY, "nope")), timeout=WAIT)
                 for ch in channels for _ in range(25)]
        t0 = time.monotonic()
        for f in calls:
            with pytest.raises(grpc.RpcError) as info:
                f.result(timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "not registered" in info.value.details()
        assert time.monotonic() - t0 < 10  # answered without the streams sending anything
        a = clients(coord.client("a"))
        assert a.join().session  # a legitimate client is served meanwhile
        gate.set()
        for ch in channels:
            ch.close()
        assert coord.stats.count("refusals", "unauthenticated") >= 100


# ------------------------------------------------------------------------------------------------- 4
def test_04_revoking_a_client_closes_its_task_stream_and_the_round_does_not_wait(tmp_path, clients):
    """Was: a revoked client kept its task stream, still got the round's task, and the round waited for it."""
    with coordinator(tmp_path) as coord:
        a, m = clients(coord.client("a")).connect(), clients(coord.client("m")).connect()
        run_id = submit(coord, run_toml())
        header, payload = a.next_task()
        m.next_task()  # m has its task and will never answer
        coord.store.revoke_client("m")
        t0 = time.monotonic()
        item = m.tasks.get(timeout=10)  # its stream ends, saying why
        assert isinstance(item, grpc.RpcError) and item.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in item.details()
        assert status(a.echo(header, payload)) == "ACCEPTED"
        record = coord.wait_committed(run_id, 1, timeout=10)
        assert time.monotonic() - t0 < 5
        assert record["per_client"]["m"]["status"] == "failed" and record["clients"] == ["a"]
        assert [(e["client"], e["reason"]) for e in record["events"]] == [("m", "revoked")]


# ------------------------------------------------------------------------------------------------- 5
def test_05_huge_integers_in_client_json_are_refused_with_one_line(tmp_path, clients):
    """Was: a 5000-digit integer in metrics_json or capabilities_json raised an uncaught ValueError (Python's
    int-string limit): a traceback in the log and UNKNOWN for the client."""
    huge = "1" * 5000
    with pytest.raises(PayloadError, match="an integer of 5000 digits"):
        _json_object('{"loss": %s}' % huge, "metrics_json")
    with coordinator(tmp_path) as coord:
        m = clients(coord.client("m"))
        with pytest.raises(grpc.RpcError) as info:
            m.join('{"num_examples": %s}' % huge)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "capabilities_json has an integer of 5000 digits (at most 1000)"
        a, b = clients(coord.client("a")).connect(), clients(coord.client("b")).connect()
        run_id = submit(coord, run_toml())
        header, payload = a.next_task()
        reply = a.push(header, payload, metrics='{"loss": %s}' % huge)
        assert status(reply) == "REFUSED" and "metrics_json has an integer of 5000 digits" in reply.reason
        assert status(a.echo(header, payload)) == "ACCEPTED"  # a refusal did not take its place
        b.echo(*b.next_task())
        assert coord.wait_status(run_id).status == "finished"


# ------------------------------------------------------------------------------------------------- 6
def test_06_every_refusal_is_answered_recorded_and_counted(tmp_path, clients):
    """Was: uploads for another run, from clients not asked, for far-future rounds (held in memory up to
    the payload limit) and cancelled ones were never recorded or counted; no `refused` status; no counters."""
    with coordinator(tmp_path) as coord:
        server, port = serve_metrics(coord.stats, 0)
        try:
            a, b, c = (clients(coord.client(n)).connect() for n in ("a", "b", "c"))
            run_id = submit(coord, run_toml(clients=2))
            asked = {}
            for cl in (a, b, c):
                try:
                    asked[cl.name] = cl.next_task(timeout=2)
                except queue.Empty:
                    idle = cl
            first = next(cl for cl in (a, b, c) if cl.name in asked)
            header, payload = asked[first.name]
            received = coord.stats.count("bytes_received")
            big = bytes(900_000)
            replies = {
                "not-active-run": first.push(header, payload, run_id="run-other"),
                "not-asked": idle.push(header, payload),
                "round-not-open": first.push(header, big, rnd=header.round + 3),
            }
            for code, reply in replies.items():
                assert (status(reply), reply.code) == ("REFUSED", code), (code, reply)
                assert reply.reason and "\n" not in reply.reason
            assert coord.stats.count("bytes_received") == received  # refused from the header: nothing was read

            def cut_short():
                h = pb.ResultHeader(session=first.session, run_id=header.run_id, round=header.round, num_examples=8,
                                    metrics_json="{}", payload=describe(big))
                yield pb.ResultPart(header=h, chunk=big[:300_000])
                time.sleep(0.3)

            call = push_result(first.channel).future(cut_short(), metadata=first.md, timeout=WAIT)
            time.sleep(0.2)
            call.cancel()
            for cl in (a, b, c):
                if cl.name in asked:
                    assert status(cl.echo(*asked[cl.name])) == "ACCEPTED"
            record = coord.wait_committed(run_id, 1)
            rows = coord.refused_rows(run_id, at_least=4)
            assert {r.code for r in rows} == {"not-active-run", "not-asked", "round-not-open", "incomplete"}
            assert all(r.status == "refused" and r.reason for r in rows)
            assert record["refused"] == {"incomplete": 1, "not-active-run": 1, "not-asked": 1, "round-not-open": 1}
            assert coord.manager.get(run_id).refused == 4
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            for line in ('fedadapt_refusals_total{code="not-asked"} 1.0', "fedadapt_rounds_committed_total 1.0",
                         'fedadapt_open_streams{kind="pull"} 3.0', "fedadapt_connected_clients 3.0",
                         "process_resident_memory_bytes", "fedadapt_bytes_received_total", "fedadapt_bytes_sent_total"):
                assert line in text, (line, text)
        finally:
            server.shutdown()


# ------------------------------------------------------------------------------------------------- 7
def test_07_invalid_content_is_rejected_when_it_arrives_and_follow_counts_every_refusal(tmp_path, clients, capsys):
    """Was: an upload with NaN or a wrong shape was acknowledged ACCEPTED (the reason reached only the round
    record), and `run follow`'s "rejected" count left out transport rejections."""
    from fedadapt.server.cli import _follow

    with coordinator(tmp_path) as coord:
        a, b = clients(coord.client("a")).connect(), clients(coord.client("b")).connect()
        run_id = submit(coord, run_toml())
        (ha, pa), (hb, pb_) = a.next_task(), b.next_task()
        tensors = codec.decode(bytearray(pa))
        name = sorted(tensors)[0]
        nan = {k: v.clone() for k, v in tensors.items()}
        nan[name].view(-1)[0] = float("nan")
        reply = a.push(ha, st_save(nan))  # codec.encode would refuse it: a hostile client uses its own
        assert status(reply) == "REJECTED" and "NaN or Inf" in reply.reason, reply
        assert status(a.echo(ha, pa)) == "DUPLICATE"  # its answer is given: the place is settled
        wrong = {**tensors, name: torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])}
        reply = b.push(hb, pb_, run_id="elsewhere")
        assert status(reply) == "REFUSED"
        reply = b.push(hb, codec.encode(wrong))
        assert status(reply) == "REJECTED" and "has shape" in reply.reason, reply
        record = coord.wait_committed(run_id, 1)
        assert set(record["rejected"]) == {"a", "b"} and record["skipped"], record
        assert _follow(coord.control(), (), run_id) == 0
        out = capsys.readouterr().out
        assert "round 1" in out and "2 rejected" in out and "1 refused (not-active-run 1)" in out, out


# ------------------------------------------------------------------------------------------------- 8
def test_08_clients_last_seen_is_kept(tmp_path, clients):
    """Was: clients.last_seen was never set."""
    with coordinator(tmp_path) as coord:
        before = {c.name: c.last_seen for c in coord.store.list_clients()}
        assert before["a"] is None
        clients(coord.client("a")).connect()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            seen = {c.name: c.last_seen for c in coord.store.list_clients()}
            if seen["a"] is not None:
                break
            time.sleep(0.05)
        assert seen["a"] is not None and seen["b"] is None


# ------------------------------------------------------------------------------------------------- 9
def test_09_a_reupload_after_a_restart_is_taken_for_the_resumed_run(tmp_path, clients, monkeypatch):
    """Was: after a coordinator restart, a client's re-upload for the resumed run was answered "not the
    active run" (it came while the run's model was still being built)."""
    from fedadapt.server import runs

    with coordinator(tmp_path) as coord:
        a, b = clients(coord.client("a")).connect(), clients(coord.client("b")).connect()
        run_id = submit(coord, run_toml(rounds=2))
        for c in (a, b):
            c.echo(*c.next_task())
        coord.wait_committed(run_id, 1)
        (ha, pa), (hb, pb_) = a.next_task(), b.next_task()  # round 2 is under way
        assert ha.round == 2
    # the coordinator "restarts" on the same database; building the run takes a while
    building, release = threading.Event(), threading.Event()
    load = runs.setup.load

    def slow_load(*args, **kw):
        building.set()
        release.wait(WAIT)
        return load(*args, **kw)

    monkeypatch.setattr(runs.setup, "load", slow_load)
    with coordinator(tmp_path) as coord:
        assert coord.store.get_run(run_id).status == "running"
        assert building.wait(WAIT)
        a2, b2 = clients(coord.client("a")).connect(), clients(coord.client("b")).connect()
        for c, header, payload in ((a2, ha, pa), (b2, hb, pb_)):  # the result kept across the restart
            reply = c.echo(header, payload)
            assert status(reply) == "ACCEPTED", reply
        release.set()
        record = coord.wait_committed(run_id, 2)
        assert record["clients"] == ["a", "b"]
        with pytest.raises(queue.Empty):
            a2.tasks.get(timeout=0.5)  # nobody was asked to train round 2 again


# ------------------------------------------------------------------------------------------------- 10
def test_10_threads_stay_flat_tiny_chunks_are_refused_and_a_slow_loris_is_cut_off(tmp_path, clients):
    """Was: worker threads never shrank after a burst; 10,000 2-byte chunks cost ~1.4 s of server CPU; a
    slow-loris upload (a byte every few seconds) held a round ~90 s."""
    limits = Limits(2**20, idle_s=1.0)
    with coordinator(tmp_path, limits=limits) as coord:
        a, b, c, m = (clients(coord.client(n)).connect() for n in ("a", "b", "c", "m"))
        run_id = submit(coord, run_toml(clients=4))
        tasks = {cl.name: cl.next_task() for cl in (a, b, c, m)}
        header, payload = tasks["a"]

        def server_threads() -> int:  # the coordinator's own (the test's clients run threads of their own)
            return sum(t.name.startswith(("payload", "control", "grpc-loop", "runs", "registry", "refusals"))
                       for t in threading.enumerate())

        baseline = server_threads()

        def tiny():
            data = bytes(20_000)
            h = pb.ResultHeader(session=a.session, run_id=header.run_id, round=header.round, num_examples=8,
                                metrics_json="{}", payload=describe(data))
            yield pb.ResultPart(header=h, chunk=data[:2])
            for i in range(2, len(data), 2):
                yield data[i:i + 2]

        t0 = time.process_time(), time.monotonic()
        reply = push_result(a.channel)(tiny(), metadata=a.md, timeout=WAIT)
        assert status(reply) == "REFUSED" and "below the minimum" in reply.reason, reply
        assert time.monotonic() - t0[1] < 5

        def slow(cl):
            data = bytes(300_000)
            h = pb.ResultHeader(session=cl.session, run_id=header.run_id, round=header.round, num_examples=8,
                                metrics_json="{}", payload=describe(data))
            yield pb.ResultPart(header=h, chunk=data[:100_000])
            time.sleep(limits.idle_s * 3)
            yield data[100_000:200_000]

        burst = [push_result(cl.channel).future(slow(cl), metadata=cl.md, timeout=WAIT) for cl in (b, c, m)
                 for _ in range(2)]
        t1 = time.monotonic()
        codes = sorted(f.result(timeout=WAIT).code for f in burst)
        assert codes == ["idle"] * 6 and time.monotonic() - t1 < limits.idle_s + 3, codes
        assert server_threads() == baseline  # six streams at once, not one thread more
        for cl in (a, b, c, m):  # the round goes on
            assert status(cl.echo(*tasks[cl.name])) == "ACCEPTED"
        coord.wait_committed(run_id, 1, timeout=10)


# ------------------------------------------------------------------------------------------------- 11
def test_11_a_client_cannot_claim_more_examples_than_its_task_allows(tmp_path, clients):
    """Was: one client took over the global model by claiming 10**9 examples beside an honest client."""
    assert examples_allowed({"local_steps": 1, "batch_size": 8}, 0) == (8, "1 local steps x batch size 8")
    assert examples_allowed({"local_steps": 1, "batch_size": 8}, 40)[0] == 40  # an honest size is never cut
    assert examples_allowed({"local_epochs": 2, "batch_size": 8}, 40)[0] == 80
    with coordinator(tmp_path) as coord:
        m = clients(coord.client("m")).connect({"num_examples": 12})
        a = clients(coord.client("a")).connect({"num_examples": 10})
        run_id = submit(coord, run_toml())
        (hm, pm), (ha, pa) = m.next_task(), a.next_task()
        fives = {k: torch.full_like(v, 5.0) for k, v in codec.decode(bytearray(pm)).items()}
        reply = m.push(hm, codec.encode(fives), num_examples=10**9)
        assert status(reply) == "REJECTED" and "num_examples 1000000000 is more than this task allows: 12" in reply.reason
        assert status(a.push(ha, pa, num_examples=10)) == "ACCEPTED"
        record = coord.wait_committed(run_id, 1)
        assert record["clients"] == ["a"] and "more than this task allows" in record["rejected"]["m"]
        got = coord.store.last_commit(run_id).tensors
        want = codec.decode(bytearray(pa))
        assert all(torch.equal(got[k], want[k]) for k in want)  # the honest client's model, not 5.0


# ------------------------------------------------------------------------------------------------- 12
def test_12_stragglers_get_a_bounded_grace_once_the_quorum_answered(tmp_path, clients):
    """Was: with round_timeout = 0, an asked client that kept its stream and heartbeats but never uploaded
    held the round forever."""
    hub = ClientHub(straggler_factor=3.0, straggler_min_s=1.0)
    with coordinator(tmp_path, hub=hub) as coord:
        a, b, c = (clients(coord.client(n)).connect() for n in ("a", "b", "c"))
        run_id = submit(coord, run_toml(clients=3, min_results=2))
        tasks = {cl.name: cl.next_task() for cl in (a, b, c)}
        t0 = time.monotonic()
        for cl in (a, b):
            assert status(cl.echo(*tasks[cl.name])) == "ACCEPTED"
        record = coord.wait_committed(run_id, 1, timeout=10)  # c heartbeats on, silent
        assert time.monotonic() - t0 < 4
        assert record["clients"] == ["a", "b"] and record["per_client"]["c"]["status"] == "failed"
        [ev] = record["events"]
        assert ev["client"] == "c" and "stragglers' grace" in ev["reason"], ev
        reply = c.echo(*tasks["c"])
        assert status(reply) in ("LATE", "REFUSED")  # the round closed (and the 1-round run ended)


def test_12_hub_grace_is_derived_from_the_answer_times():
    hub = ClientHub(heartbeat_timeout=60.0, straggler_factor=3.0, straggler_min_s=0.3)
    hub.begin_run("r", "{}", quorum=2)
    ss = {n: hub.join(n, {}) for n in "abc"}
    for s in ss.values():
        hub.attach(s)
    out = []
    t = threading.Thread(target=lambda: out.append(hub.run([TaskMessage(n, 1, "train", {}, b"") for n in "abc"],
                                                           timeout=None)), daemon=True)
    t0 = time.monotonic()
    t.start()
    time.sleep(0.2)
    for n in "ab":
        assert hub.submit(ss[n], ResultMessage(n, 1, 1, {}, b""), "r").status == ACCEPTED
    t.join(5)
    elapsed = time.monotonic() - t0
    assert not t.is_alive() and [m.client_id for m in out[0]] == ["a", "b"]
    assert 0.55 <= elapsed < 2.0, elapsed  # 3 x the median answer time (~0.2 s), more than the 0.3 s floor
    assert hub.submit(ss["c"], ResultMessage("c", 1, 1, {}, b""), "r").status == LATE


# ------------------------------------------------------------------------------------------------- 13
def test_13_a_cancelled_upload_is_recorded_the_same_way_every_time(tmp_path, clients):
    """Was: the sync server saw a cancel either as end of stream (recorded as a truncated rejection) or as
    an error (not recorded at all)."""
    with coordinator(tmp_path, limits=Limits(2**20, uploads_per_client=100)) as coord:
        a, b = clients(coord.client("a")).connect(), clients(coord.client("b")).connect()
        run_id = submit(coord, run_toml())
        header, payload = a.next_task()
        data = bytes(700_000)
        n = 8
        for i in range(n):
            def parts():
                h = pb.ResultHeader(session=a.session, run_id=header.run_id, round=header.round, num_examples=8,
                                    metrics_json="{}", payload=describe(data))
                yield pb.ResultPart(header=h, chunk=data[:300_000])
                time.sleep(5)

            call = push_result(a.channel).future(parts(), metadata=a.md, timeout=WAIT)
            time.sleep(0.3 + 0.05 * i)  # cancelled at different moments, after its first chunk is in
            call.cancel()
        a.echo(header, payload)
        b.echo(*b.next_task())
        record = coord.wait_committed(run_id, 1)
        rows = coord.refused_rows(run_id, at_least=n)
        assert sum(r.count for r in rows) == n and {r.code for r in rows} == {"incomplete"}, rows
        assert all(r.reason.startswith("payload truncated: 300000 of 700000 bytes arrived") for r in rows), rows
        assert record["refused"] == {"incomplete": n} and not record["rejected"]


# ------------------------------------------------------------------------------------------------- 14
def test_14_a_refusing_client_settles_its_place_and_waiting_is_reported(tmp_path, clients, caplog):
    """Was: a daemon that refused the run (labels it does not have) uploaded num_examples = 0, which the
    transport rejected, so round 1 never committed; a waiting run showed only "running"; a SIGTERM'd
    coordinator logged "run ... stopped" while the run stayed running and resumed on restart."""
    caplog.set_level(logging.INFO, logger="fedadapt.server")
    with coordinator(tmp_path) as coord:
        a, b = clients(coord.client("a")).connect(), clients(coord.client("b")).connect()
        run_id = submit(coord, run_toml(rounds=3, clients=3))
        deadline = time.monotonic() + WAIT
        while coord.manager.get(run_id).waiting != "waiting for 3 clients, 2 connected":
            assert time.monotonic() < deadline, coord.manager.get(run_id)
            time.sleep(0.02)
        state = coord.manager.follow_start(run_id)
        events, _ = coord.manager.follow_poll(state)
        assert [e.status for e in events if e.kind == "waiting"] == ["waiting for 3 clients, 2 connected"]
        assert "waiting for 3 clients, 2 connected" in caplog.text
        c = clients(coord.client("c")).connect()
        header, payload = c.next_task()
        reply = c.push(header, codec.encode({}), num_examples=0,
                       metrics={"refused": "label 'spam' is not one of the run's labels"})
        assert status(reply) == "REJECTED" and "label 'spam'" in reply.reason, reply
        t0 = time.monotonic()
        for cl in (a, b):
            cl.echo(*cl.next_task())
        record = coord.wait_committed(run_id, 1, timeout=10)
        assert time.monotonic() - t0 < 5 and record["clients"] == ["a", "b"]
        assert record["per_client"]["c"]["status"] == "rejected"
        assert c.next_task()[0].round == 2  # round 2 is under way when the coordinator stops
        caplog.clear()
    assert "stays running after committed round 1" in caplog.text and f"run {run_id} stopped" not in caplog.text
    with Store(f"sqlite:///{tmp_path / 'coord.db'}", tmp_path / "blobs") as store:
        assert store.get_run(run_id).status == "running"
