"""A hostile client against a REAL coordinator process (TLS, on SQLite and on PostgreSQL).

The test process is "mallory", a registered client that speaks raw gRPC: it joins, holds a task
stream, receives every task, and answers each round with malformed, poisoned or replayed uploads,
while three honest client daemons train. A broken or unwanted upload must come back REFUSED (recorded in
the store's refusals, with its reason), mallory's one answer per round REJECTED with the engine's reason
(its content is checked when it arrives; the round record keeps the reason), replays DUPLICATE; each
round must aggregate exactly the three honest clients, and the final adapter must be bit-identical to the
in-process simulation of the three honest clients alone.

The `solo` tests run mallory alone against a coordinator and check that single hostile inputs cannot
fail a run or escape as internal errors.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from dataclasses import dataclass

import grpc
import pytest
import torch
from deploy import Deployment, lora_run_toml
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from fedadapt.core import codec
from fedadapt.proto import fedadapt_pb2 as pb
from fedadapt.proto import fedadapt_pb2_grpc as pb_grpc
from fedadapt.proto.auth import Credentials, channel_credentials, load_credentials, metadata
from fedadapt.proto.chunks import describe, split
from fedadapt.server.store import Store

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
HONEST = ["role0", "role1", "role2"]
MALLORY = "mallory"
MAX_PAYLOAD = 1024 * 1024  # the coordinator runs with --max-payload-mb 1
ROUNDS = 6
WAIT = 120.0  # bound on any single wait for the coordinator
S = pb.PushReply  # statuses


# ----------------------------------------------------------------------------------- the hostile client
@dataclass
class Task:
    header: pb.TaskHeader
    payload: bytes

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return codec.decode(self.payload, max_bytes=MAX_PAYLOAD)


class Hostile:
    """A client that speaks raw gRPC and sends whatever it likes. Owns one channel; `close` ends it."""

    def __init__(self, d: Deployment, creds: Credentials):
        self.d = d
        self.creds = creds
        self.md = metadata(creds)
        self.channel = grpc.secure_channel(f"localhost:{d.port}", channel_credentials(creds))
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.session = ""
        self.stream = None
        self._parts: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @classmethod
    def registered(cls, d: Deployment, name: str = MALLORY) -> Hostile:
        return cls(d, load_credentials(d.certs / "clients" / name))

    def join(self, capabilities: dict | str | None = None) -> pb.JoinReply:
        caps = capabilities if isinstance(capabilities, str) else json.dumps(capabilities or {"num_examples": 12})
        reply = self.stub.Join(pb.JoinRequest(capabilities_json=caps, version="evil"), metadata=self.md, timeout=30)
        self.session = reply.session
        return reply

    def open_stream(self) -> None:
        """PullTask on a background reader (so every read can be bounded), plus heartbeats."""
        self.stream = self.stub.PullTask(pb.PullRequest(session=self.session), metadata=self.md)
        stream, parts = self.stream, self._parts

        def read():
            try:
                for part in stream:
                    parts.put(part)
                parts.put(None)
            except grpc.RpcError as exc:
                parts.put(exc)

        def beat():
            while not self._stop.wait(1.0):
                try:
                    self.stub.Heartbeat(pb.HeartbeatRequest(session=self.session), metadata=self.md, timeout=10)
                except grpc.RpcError:
                    pass

        for fn in (read, beat):
            t = threading.Thread(target=fn, daemon=True)
            t.start()
            self._threads.append(t)

    def _part(self, deadline: float):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        item = self._parts.get(timeout=left)
        if item is None or isinstance(item, grpc.RpcError):
            raise AssertionError(f"{self.creds.name}'s task stream ended: {item!r}")
        return item

    def next_task(self, timeout: float = WAIT, alive=lambda: True) -> Task:
        """The next task (header and every chunk, verified). `alive()` is polled while waiting, so a run
        that failed does not keep the test waiting for a task that will never come."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                first = self._part(min(deadline, time.monotonic() + 1.0))
                break
            except (queue.Empty, TimeoutError):
                if time.monotonic() >= deadline:
                    raise AssertionError(f"no task within {timeout}s; logs:\n{self.d.logs()}") from None
                alive()
        assert first.HasField("header"), first  # the header rides with the first chunk
        header, buf = first.header, first.chunk
        while len(buf) < header.payload.size:
            part = self._part(deadline)
            assert not part.HasField("header"), "a header inside a task"
            buf += part.chunk
        assert len(buf) == header.payload.size and hashlib.sha256(buf).digest() == header.payload.sha256
        return Task(header, buf)

    def push(self, parts: list[pb.ResultPart], md=None) -> pb.PushReply:
        return self.stub.PushResult(iter(parts), metadata=self.md if md is None else md, timeout=30)

    def result_parts(self, task: Task, payload: bytes, *, round: int | None = None, num_examples: int = 12,
                     metrics_json: str = '{"loss": 0.5}', run_id: str | None = None, session: str | None = None,
                     announce: pb.Payload | None = None, chunks: list[bytes] | None = None) -> list[pb.ResultPart]:
        """An upload for `task`: by default a well-formed one carrying `payload`; every field overridable."""
        header = pb.ResultHeader(session=self.session if session is None else session,
                                 run_id=task.header.run_id if run_id is None else run_id,
                                 round=task.header.round if round is None else round,
                                 num_examples=num_examples, metrics_json=metrics_json,
                                 payload=describe(payload) if announce is None else announce)
        body = [bytes(c) for c in split(payload)] if chunks is None else chunks
        # plain protobuf parts, as any client in another language would send them
        first = pb.ResultPart(header=header, chunk=body[0] if body else b"")
        return [first, *(pb.ResultPart(chunk=c) for c in body[1:])]

    def close(self) -> None:
        self._stop.set()
        if self.stream is not None:
            self.stream.cancel()
        self.channel.close()
        for t in self._threads:
            t.join(timeout=15)


@pytest.fixture
def hostiles():
    made: list[Hostile] = []

    def make(d: Deployment, creds: Credentials | None = None) -> Hostile:
        h = Hostile(d, creds) if creds is not None else Hostile.registered(d)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


class Control:
    """The admin's view of the coordinator, on one channel closed at the end."""

    def __init__(self, d: Deployment):
        self.d = d
        admin = load_credentials(d.certs / "admin")
        self.md = metadata(admin)
        self.channel = grpc.secure_channel(f"localhost:{d.port}", channel_credentials(admin))
        self.stub = pb_grpc.ControlStub(self.channel)

    def submit(self, toml: str) -> str:
        return self.stub.SubmitRun(pb.SubmitRunRequest(config_toml=toml), metadata=self.md, timeout=30).run_id

    def get(self, run_id: str) -> pb.RunInfo:
        return self.stub.GetRun(pb.RunRef(run_id=run_id), metadata=self.md, timeout=30)

    def assert_not_over(self, run_id: str) -> None:
        info = self.get(run_id)
        if info.status in ("failed", "stopped", "finished"):
            raise AssertionError(f"run {run_id} is {info.status} ({info.error}); logs:\n{self.d.logs()}")

    def wait_done(self, run_id: str, timeout: float = WAIT) -> pb.RunInfo:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.get(run_id)
            if info.status in ("failed", "stopped", "finished"):
                return info
            time.sleep(0.1)
        raise AssertionError(f"run {run_id} did not end within {timeout}s; logs:\n{self.d.logs()}")


@pytest.fixture
def controls():
    made: list[Control] = []

    def make(d: Deployment) -> Control:
        made.append(Control(d))
        return made[-1]

    yield make
    for c in made:
        c.channel.close()


# ----------------------------------------------------------------------------------- attacks
def expect(reply: pb.PushReply, status: int, *needles: str) -> str:
    assert reply.status == status, (S.Status.Name(reply.status), reply.reason, S.Status.Name(status))
    for n in needles:
        assert n in reply.reason, (n, reply.reason)
    return reply.reason


def expect_rpc_error(call, code: grpc.StatusCode, needle: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, (info.value.code(), info.value.details())
    assert needle in (info.value.details() or ""), info.value.details()


def poisoned(task: Task, rnd_index: int) -> tuple[bytes, str]:
    """The engine-level attack of a round: a transport-valid upload whose tensors break the contract.
    Returns (payload, what the engine's rejection reason must say)."""
    g = task.tensors
    name = sorted(g)[0]
    t = g[name]
    kind = rnd_index % 6
    if kind == 0:  # wrong shape
        return st_save({**g, name: torch.zeros(t.shape[0] + 1, *t.shape[1:], dtype=t.dtype)}), "has shape"
    if kind == 1:  # NaN
        bad = t.clone()
        bad.view(-1)[0] = float("nan")
        return st_save({**g, name: bad}), "NaN or Inf"
    if kind == 2:  # wrong dtype
        return st_save({**g, name: t.to(torch.float64)}), "has dtype"
    if kind == 3:  # not safetensors at all (the digest is right: the bytes are what mallory meant)
        return b"\x89PNG\r\n\x1a\n" + b"garbage" * 300, "not valid safetensors"
    if kind == 4:  # Inf
        bad = t.clone()
        bad.view(-1)[-1] = -float("inf")
        return st_save({**g, name: bad}), "NaN or Inf"
    return st_save({**g, "evil.lora_B.weight": torch.ones(2, 2)}), "unexpected tensor"


def transport_attacks(h: Hostile, task: Task, honest_payload: bytes) -> list[str]:
    """Uploads refused before the engine sees them (REFUSED, never the client's answer: it may still send
    one); returns the reasons the store's refusals must record for this round."""
    n = len(honest_payload)
    digest = hashlib.sha256(honest_payload).digest()
    reasons = []

    # truncated: fewer bytes than announced
    reasons.append(expect(h.push(h.result_parts(task, honest_payload, chunks=[honest_payload[:n - 10]])),
                          S.REFUSED, "truncated", f"{n - 10} of {n}"))
    # corrupted: right size, one byte flipped
    flipped = bytearray(honest_payload)
    flipped[n // 2] ^= 0xFF
    reasons.append(expect(h.push(h.result_parts(task, honest_payload, chunks=[bytes(flipped)])),
                          S.REFUSED, "sha256 does not match"))
    # more bytes than announced
    reasons.append(expect(h.push(h.result_parts(task, honest_payload, chunks=[honest_payload, b"tail"])),
                          S.REFUSED, "overflows"))
    # oversized: announced above --max-payload-mb, refused before any allocation
    big = pb.Payload(size=MAX_PAYLOAD + 1, sha256=digest)
    reasons.append(expect(h.push(h.result_parts(task, honest_payload, announce=big, chunks=[])),
                          S.REFUSED, "exceeds the limit of 1048576 bytes"))
    # a digest of the wrong length
    reasons.append(expect(h.push(h.result_parts(task, honest_payload, announce=pb.Payload(size=n, sha256=digest[:16]))),
                          S.REFUSED, "sha256"))
    # a second header inside one upload
    parts = h.result_parts(task, honest_payload)
    reasons.append(expect(h.push([*parts[:1], *parts[1:], parts[0]]), S.REFUSED, "second header"))
    # an absurd example count (it would dominate the example-weighted average), read from the header alone
    reasons.append(expect(h.push(h.result_parts(task, honest_payload, num_examples=10**12)),
                          S.REFUSED, "num_examples", str(10**12)))
    # metrics that are not a JSON object
    reasons.append(expect(h.push(h.result_parts(task, honest_payload, metrics_json="[1, 2]")),
                          S.REFUSED, "metrics_json must be a JSON object"))
    reasons.append(expect(h.push(h.result_parts(task, honest_payload, metrics_json="{loss: nope")),
                          S.REFUSED, "metrics_json is not valid JSON"))
    reasons.append(expect(h.push(h.result_parts(task, honest_payload, metrics_json='"x"' * 40_000)),
                          S.REFUSED, "metrics_json is larger than"))
    # a result for a run that is not the active one, and for a round that is not open
    reasons.append(expect(h.push(h.result_parts(task, honest_payload, run_id="0" * 32)), S.REFUSED,
                          "not the active run"))
    reasons.append(expect(h.push(h.result_parts(task, honest_payload, round=task.header.round + 5)), S.REFUSED,
                          "is not open"))

    # refused outright by gRPC status: no header first, a session that is not mallory's
    expect_rpc_error(lambda: h.push([pb.ResultPart(chunk=b"x")]), grpc.StatusCode.INVALID_ARGUMENT,
                     "must start with its header")
    reasons.append("a result must start with its header")
    expect_rpc_error(lambda: h.push(h.result_parts(task, honest_payload, session="f" * 32)),
                     grpc.StatusCode.NOT_FOUND, "unknown session")
    reasons.append("unknown session")
    return reasons


# ----------------------------------------------------------------------------------- the scenario
def test_hostile_client_cannot_touch_the_global_model(deployment, data_file, reference, hostiles, controls):
    d = deployment
    for name in [*HONEST, MALLORY]:
        d.add_client(name)
    coord = d.start_coordinator("--max-payload-mb", "1")
    ctl = controls(d)
    m = hostiles(d)
    ca = m.creds.ca_cert

    # refused at Join, with a message that says why
    for creds, needle in [
        (Credentials("eve", "a" * 43, ca), "client 'eve' is not registered"),
        (Credentials(MALLORY, "b" * 43, ca), "wrong credential for client 'mallory'"),
        (Credentials("role0", m.creds.token, ca), "wrong credential for client 'role0'"),  # impersonation
    ]:
        intruder = hostiles(d, creds)
        expect_rpc_error(lambda: intruder.join(), grpc.StatusCode.UNAUTHENTICATED, needle)
        expect_rpc_error(lambda: intruder.stub.Heartbeat(pb.HeartbeatRequest(session="x"), metadata=intruder.md,
                                                         timeout=10), grpc.StatusCode.UNAUTHENTICATED, needle)
    # a client token is not an admin token
    client_control = pb_grpc.ControlStub(m.channel)
    expect_rpc_error(lambda: client_control.ListRuns(pb.ListRunsRequest(), metadata=m.md, timeout=10),
                     grpc.StatusCode.UNAUTHENTICATED, "wrong admin credential")

    reply = m.join()
    assert reply.session and reply.chunk_bytes > 0
    m.open_stream()
    for name in HONEST:
        d.start_client(name)
    toml = lora_run_toml(data_file, rounds=ROUNDS, clients_per_round=4, min_clients=4, min_results=3)
    run_id = ctl.submit(toml)

    expected: dict[int, dict] = {}
    for i in range(ROUNDS):
        task = m.next_task(alive=lambda: ctl.assert_not_over(run_id))
        rnd = task.header.round
        assert (task.header.run_id, rnd, task.header.kind) == (run_id, i + 1, "train")
        assert json.loads(task.header.run_spec_json) and "seed" in json.loads(task.header.config_json)
        honest_payload = codec.encode(task.tensors)  # the global state, a transport-valid upload
        assert len(honest_payload) < MAX_PAYLOAD

        transport = transport_attacks(m, task, honest_payload)
        if rnd >= 2:  # a replay of an earlier round's answer
            expect(m.push(m.result_parts(task, honest_payload, round=rnd - 1)), S.DUPLICATE)

        payload, defect = poisoned(task, i)
        upload = m.result_parts(task, payload)
        expect(m.push(upload), S.REJECTED, defect)  # checked when it arrives: mallory is told why at once
        expect(m.push(upload), S.DUPLICATE, "already received")  # replayed as is
        expect(m.push(m.result_parts(task, honest_payload)), S.DUPLICATE)  # the first answer is the one kept
        expected[rnd] = {"defect": defect, "transport": transport}

    # a client's credential cannot stop the run
    expect_rpc_error(lambda: client_control.StopRun(pb.RunRef(run_id=run_id), metadata=m.md, timeout=10),
                     grpc.StatusCode.UNAUTHENTICATED, "wrong admin credential")
    info = ctl.wait_done(run_id)
    assert info.status == "finished", (info.error, d.logs())
    assert info.round == ROUNDS

    with Store(d.db_url, d.data_dir) as store:
        records = dict(store.records(run_id))
        assert sorted(records) == list(range(1, ROUNDS + 1))
        for rnd, want in expected.items():
            rec = records[rnd]
            assert rec["clients"] == HONEST, (rnd, rec)
            assert rec["skipped"] is None, (rnd, rec)
            assert set(rec["rejected"]) == {MALLORY} and want["defect"] in rec["rejected"][MALLORY], (rnd, rec)

            parts = store.participations(run_id, rnd)
            assert {p.client for p in parts if p.status == "accepted"} == set(HONEST), (rnd, parts)
            mine = [p for p in parts if p.client == MALLORY]
            assert [(p.status, want["defect"] in p.reason) for p in mine] == [("rejected", True)], (rnd, mine)
            assert mine[0].bytes_down > 0, (rnd, mine)
            refused = sum(n for code, n in rec["refused"].items() if code != "unauthenticated")  # not an intruder's
            assert refused == len(want["transport"]), (rnd, rec["refused"])

        # every refusal is in the store, with the reason mallory was given (written within a second or so)
        deadline = time.monotonic() + 30
        while True:
            rows = [r for r in store.refusals(run_id) if r.client == MALLORY]
            got = {rnd: sorted(r.reason for r in rows if r.round == rnd for _ in range(r.count)) for rnd in expected}
            want_reasons = {rnd: len(w["transport"]) for rnd, w in expected.items()}
            if {rnd: len(v) for rnd, v in got.items()} == want_reasons or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for rnd, want in expected.items():
            assert all(r.status == "refused" for r in rows)
            assert len(got[rnd]) == len(want["transport"]), (rnd, got[rnd], want["transport"])
            for needle in want["transport"]:
                assert any(needle in reason for reason in got[rnd]), (rnd, needle, got[rnd])

    # the strong check: mallory changed nothing, bit for bit
    got = load_file(info.model_path)
    want = reference(toml)
    assert got.keys() == want.keys() and any("lora_A" in k for k in got)
    for k in got:
        assert torch.equal(got[k], want[k]), k
    assert "Traceback" not in coord.text(), coord.text()[-4000:]


# ----------------------------------------------------------------------------------- solo: one hostile input each
@pytest.fixture
def solo(deployment, data_file, hostiles, controls):
    """A coordinator (max payload 1 MiB) whose only client is mallory, connected and streaming; runs of
    one round that need just her."""
    d = deployment
    d.add_client(MALLORY)
    coord = d.start_coordinator("--max-payload-mb", "1")
    m = hostiles(d)
    ctl = controls(d)
    toml = lora_run_toml(data_file, rounds=1, clients_per_round=1, min_clients=1, min_results=1)

    @dataclass
    class Solo:
        d: Deployment
        coord: object
        m: Hostile
        ctl: Control
        toml: str

        def start(self, join_caps=None) -> tuple[str, Task]:
            self.m.join(join_caps)
            self.m.open_stream()
            run_id = self.ctl.submit(self.toml)
            return run_id, self.m.next_task(timeout=WAIT, alive=lambda: self.ctl.assert_not_over(run_id))

        def answer_validly(self, task: Task) -> None:
            expect(self.m.push(self.m.result_parts(task, codec.encode(task.tensors))), S.ACCEPTED)

        def finished(self, run_id: str) -> pb.RunInfo:
            info = self.ctl.wait_done(run_id)
            assert info.status == "finished", (f"a hostile input failed the run: {info.error}",
                                               self.coord.text()[-3000:])
            return info

    return Solo(d, coord, m, ctl, toml)


def test_solo_baseline_a_valid_answer_finishes_the_run(solo):
    run_id, task = solo.start()
    solo.answer_validly(task)
    solo.finished(run_id)
    with Store(solo.d.db_url, solo.d.data_dir) as store:
        assert [(p.client, p.status) for p in store.participations(run_id, 1)] == [(MALLORY, "accepted")]


def test_solo_an_absurd_announced_size_is_refused_and_recorded(solo):
    """BUG (fixed): the rejection was recorded with bytes_up = the ANNOUNCED size (a uint64 the client picks);
    at or above 2**63 it does not fit the store's BIGINT column, commit_round raised and the run failed."""
    run_id, task = solo.start()
    digest = hashlib.sha256(b"").digest()
    for size in (2**63, 2**64 - 1):
        expect(solo.m.push(solo.m.result_parts(task, b"", announce=pb.Payload(size=size, sha256=digest), chunks=[])),
               S.REFUSED, "exceeds the limit")
    solo.answer_validly(task)
    solo.finished(run_id)
    with Store(solo.d.db_url, solo.d.data_dir) as store:
        deadline = time.monotonic() + 30
        while sum(r.count for r in store.refusals(run_id)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        refused = store.refusals(run_id)
        assert [p.status for p in store.participations(run_id, 1)] == ["accepted"]
    assert sum(r.count for r in refused) == 2 and all("exceeds the limit" in r.reason for r in refused)
    assert all(0 <= r.bytes_up < 2**63 for r in refused)


def test_solo_a_huge_integer_metric_does_not_fail_the_run(solo):
    """BUG: metrics_json {"loss": 10**400} parses to a Python int; the engine's math.isfinite(v) raises
    OverflowError (not PayloadError) inside RoundEngine._accept and the whole run fails."""
    run_id, task = solo.start()
    expect(solo.m.push(solo.m.result_parts(task, codec.encode(task.tensors),
                                           metrics_json='{"loss": 1' + "0" * 400 + ', "accuracy": 0.5}')),
           S.ACCEPTED)
    solo.finished(run_id)


def test_solo_deeply_nested_json_is_rejected_not_an_internal_error(solo):
    """BUG: json.loads raises RecursionError (not JSONDecodeError) on deep nesting well under MAX_JSON;
    _json_object lets it escape, so PushResult / Join answer UNKNOWN (an exception in the servicer)
    instead of REJECTED / INVALID_ARGUMENT, and the rejection is never recorded."""
    run_id, task = solo.start()
    nested = "[" * 50_000
    problems = []
    try:
        reply = solo.m.push(solo.m.result_parts(task, codec.encode(task.tensors), metrics_json=nested))
        if reply.status != S.REFUSED or "metrics_json" not in reply.reason:
            problems.append(f"PushResult answered {S.Status.Name(reply.status)} ({reply.reason})")
    except grpc.RpcError as exc:
        problems.append(f"PushResult failed with {exc.code().name}: {exc.details()}")
    solo.answer_validly(task)  # the run itself is unharmed either way
    solo.finished(run_id)
    other = Hostile.registered(solo.d)  # after the run: a Join that succeeded would replace mallory's session
    try:
        other.join(nested)
        problems.append("Join accepted nested capabilities_json")
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
            problems.append(f"Join failed with {exc.code().name}: {exc.details()}")
    finally:
        other.close()
    assert not problems, problems


@pytest.mark.parametrize("caps", [{"num_examples": "lots"}, {"num_examples": [1]}, {"num_examples": 1e308 * 10}],
                         ids=["string", "list", "inf"])
def test_solo_hostile_capabilities_do_not_fail_the_run(solo, caps):
    """BUG: Join accepts any JSON object as capabilities; ClientHub.clients() then calls
    int(capabilities["num_examples"]), which raises ValueError / TypeError / OverflowError inside the
    round engine, so every run fails while such a client is connected."""
    caps_json = json.dumps(caps)  # float('inf') becomes the non-standard token Infinity, which json accepts
    try:
        run_id, task = solo.start(caps_json)
    except grpc.RpcError as exc:  # refusing such a Join is a fine outcome too
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        return
    solo.answer_validly(task)
    solo.finished(run_id)
