"""The client daemon: join a coordinator, receive tasks on one long-lived stream, train, upload.

It survives the coordinator going away: every failure short of a refusal (unknown client, revoked,
wrong credential) ends the session, and the agent joins again with exponential backoff. A result
whose upload was interrupted is kept and uploaded first on the next session; the coordinator
de-duplicates it by (run, round, client). A task received again (the coordinator restarted before
committing the round) is answered from the kept result instead of training twice. An upload the
coordinator refuses for now (busy) is sent again after the time it says.

The agent registers how many examples it trains on (`num_examples` in its Join capabilities): the
coordinator refuses a result that claims more than its task allows or than the client registered. Its
data depends on the run, so on the first task of a run whose data size differs from what it registered,
it joins again with the new size before it trains (the coordinator sends the task again).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import grpc

from fedadapt.client.workload import Workload
from fedadapt.core import codec
from fedadapt.core.errors import AuthError, FedadaptError, PayloadError
from fedadapt.proto import fedadapt_pb2 as pb
from fedadapt.proto import fedadapt_pb2_grpc as pb_grpc
from fedadapt.proto.auth import Credentials, channel_credentials
from fedadapt.proto.auth import metadata as auth_metadata
from fedadapt.proto.chunks import CHUNK_BYTES, Reassembler, describe, framed, framed_upload, pull_task, push_result
from fedadapt.runtime.engine import TaskMessage
from fedadapt.runtime.executor import REFUSED, refusal

FATAL = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
MAX_RETRIES = 20  # an upload refused for now (the coordinator is busy) is sent again at most this often
# Each agent its own connection (gRPC would otherwise share one between the agents of a process, e.g. the
# virtual clients of `simulate --transport grpc`, and a coordinator bounds the streams of one connection).
CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
                   ("grpc.keepalive_permit_without_calls", 1), ("grpc.use_local_subchannel_pool", 1)]


@dataclass
class Upload:
    run_id: str
    round: int
    kind: str
    config_json: str  # the task it answers: a re-sent task with another config (e.g. other peers) is new work
    num_examples: int
    metrics: dict[str, float]
    payload: bytes


class ClientAgent:
    def __init__(self, target: str, creds: Credentials, make_workload: Callable[[dict[str, Any]], Workload], *,
                 insecure: bool = False, capabilities: dict[str, Any] | None = None,
                 max_payload_bytes: int = codec.DEFAULT_MAX_BYTES, backoff: tuple[float, float] = (0.5, 30.0),
                 train_lock: threading.Lock | None = None, log: Callable[[str], None] = print):
        self.target = target
        self.creds = creds
        self.make_workload = make_workload
        self.insecure = insecure
        self.capabilities = capabilities or {}
        self.max_payload_bytes = max_payload_bytes
        self.backoff = backoff
        self.train_lock = train_lock or nullcontext()
        self.log = log
        self.stopped = threading.Event()
        self._metadata = auth_metadata(creds)
        self._workload: tuple[str, Workload] | None = None  # (run id, workload) of the latest run
        self._pending: Upload | None = None  # computed, not yet acknowledged by the coordinator
        self._last: Upload | None = None  # the latest acknowledged result, to answer a re-sent task
        self._stream = None
        self._trailer = False  # the coordinator takes the digest after the payload (JoinReply.digest_trailer)

    def run(self) -> None:
        """Serve until `stop()`; raises AuthError if the coordinator refuses this client."""
        delay = self.backoff[0]
        while not self.stopped.is_set():
            try:
                joined = self._session()
                delay = self.backoff[0] if joined else delay
            except grpc.RpcError as exc:
                if exc.code() in FATAL:
                    raise AuthError(f"coordinator {self.target} refused {self.creds.name!r}: {exc.details()}") from None
                if not self.stopped.is_set():
                    self.log(f"coordinator {self.target} unavailable ({exc.code().name}: {exc.details()}); "
                             f"retrying in {delay:.1f}s")
            if self.stopped.wait(delay * random.uniform(0.5, 1.0)):
                return
            delay = min(delay * 2, self.backoff[1])

    def stop(self) -> None:
        self.stopped.set()
        if self._stream is not None:
            self._stream.cancel()

    # ------------------------------------------------------------------ one session
    def _session(self) -> bool:
        with self._channel() as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            previous = None  # the stream of the session a re-registration replaces
            while True:
                reply = stub.Join(pb.JoinRequest(capabilities_json=json.dumps(self.capabilities), version=_version()),
                                  metadata=self._metadata, timeout=30)
                if previous is not None:  # only now: the new session exists, so leaving is not a departure
                    previous.cancel()
                session = reply.session
                self._trailer = reply.digest_trailer
                self.log(f"joined {self.target} as {self.creds.name!r}")
                if self._pending is not None:
                    self._push(channel, session, self._pending)
                stream = pull_task(channel)(pb.PullRequest(session=session), metadata=self._metadata)
                self._stream = stream
                beat = threading.Thread(target=self._heartbeat,
                                        args=(stub, session, reply.heartbeat_interval_s, stream), daemon=True)
                beat.start()
                if not self._serve(channel, session, stream):
                    return True
                previous = stream  # join again with the new registration; the coordinator sends the task again

    def _serve(self, channel: grpc.Channel, session: str, stream) -> bool:
        """Answer the tasks of one session's stream; True if it must be joined again (a new registration)."""
        again = False
        try:
            parts = iter(stream)
            for part in parts:
                if part.header is None:
                    raise PayloadError("task stream out of step: a chunk without its header")
                header = part.header
                buf = Reassembler(header.payload, self.max_payload_bytes)
                buf.add(part.chunk)
                while not buf.complete:
                    part = next(parts)
                    if part.header is not None:
                        raise PayloadError("task stream out of step: a header inside a task")
                    buf.add(part.chunk)
                if self._register(header):
                    again = True
                    return True
                upload = self._handle(header, buf.result())
                self._pending = upload
                self._push(channel, session, upload)
        except PayloadError as exc:  # a broken task stream: log it and start a fresh session
            self.log(f"dropped a malformed task: {exc}")
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self.stopped.is_set():
                return False
            raise
        finally:
            if not again:
                stream.cancel()
                self._stream = None
        return False

    def _answered(self, header: pb.TaskHeader) -> Upload | None:
        """The kept result, if `header` asks for it again (after a coordinator restart: same inputs)."""
        last = self._last
        if last is not None and (last.run_id, last.round, last.kind, last.config_json) == (
                header.run_id, header.round, header.kind, header.config_json):
            return last
        return None

    def _workload_for(self, header: pb.TaskHeader) -> Workload | FedadaptError:
        if self._workload is None or self._workload[0] != header.run_id:
            self._workload = None  # release the previous run's model first
            try:
                self._workload = (header.run_id, self.make_workload(json.loads(header.run_spec_json)))
            except FedadaptError as exc:  # this run, not the daemon: refuse its tasks, stay up
                self._workload = (header.run_id, exc)
        return self._workload[1]

    def _register(self, header: pb.TaskHeader) -> bool:
        """True if this task's run has this client train on another number of examples than it registered:
        the capabilities now say the new number, and the session must be joined again before training."""
        if self._answered(header) is not None:
            return False
        w = self._workload_for(header)
        if isinstance(w, Exception):
            return False
        n = len(w.data)
        if self.capabilities.get("num_examples") == n:
            return False
        self.capabilities = {**self.capabilities, "num_examples": n}
        self.log(f"run {header.run_id}: registering {n} training examples with the coordinator")
        return True

    def _handle(self, header: pb.TaskHeader, payload: bytes) -> Upload:
        last = self._answered(header)
        if last is not None:
            return last  # asked again after a coordinator restart: same inputs, same answer
        w = self._workload_for(header)
        msg = TaskMessage(self.creds.name, header.round, header.kind, json.loads(header.config_json), payload)
        if isinstance(w, Exception):
            self.log(f"round {header.round}: refused run {header.run_id}: {w}")
            reply = refusal(msg, 0, str(w))
        else:
            self.log(f"round {header.round}: {header.kind} task received")
            start = time.perf_counter()
            with self.train_lock:
                reply = w.executor.run(msg, w.data)
            why = reply.metrics.get(REFUSED)
            done = f"refused: {why}" if why else f"{header.kind} on {reply.num_examples} examples" + (
                f", loss {reply.metrics['loss']:.4f}" if "loss" in reply.metrics else "")
            self.log(f"round {header.round}: {done} in {time.perf_counter() - start:.1f}s")
        return Upload(header.run_id, header.round, header.kind, header.config_json, reply.num_examples,
                      reply.metrics, reply.payload)

    def _push(self, channel: grpc.Channel, session: str, up: Upload) -> None:
        for attempt in range(MAX_RETRIES + 1):
            header = pb.ResultHeader(session=session, run_id=up.run_id, round=up.round, num_examples=up.num_examples,
                                     metrics_json=json.dumps(up.metrics))
            if self._trailer and len(up.payload) > CHUNK_BYTES:  # hashed while it streams; the digest goes last
                parts = framed_upload(header, up.payload)
            else:
                header.payload.CopyFrom(describe(up.payload))
                parts = framed(pb.ResultPart, header, up.payload)
            reply = push_result(channel)(parts, metadata=self._metadata)
            status = _status_name(reply.status)
            self.log(f"round {up.round}: uploaded {len(up.payload) / 1e6:.2f} MB, {status}"
                     + (f" ({reply.reason})" if reply.reason else ""))
            if reply.status != pb.PushReply.REFUSED or reply.retry_after_s <= 0 or attempt == MAX_RETRIES:
                break
            if self.stopped.wait(min(reply.retry_after_s, 30.0) * random.uniform(1.0, 1.5)):
                return
        self._pending = None
        self._last = up

    def _heartbeat(self, stub, session: str, interval: float, stream) -> None:
        """Keep the session alive while training; end the stream if the coordinator forgot us."""
        while not self.stopped.wait(max(interval, 0.2)) and self._stream is stream:
            try:
                if not stub.Heartbeat(pb.HeartbeatRequest(session=session), metadata=self._metadata,
                                      timeout=max(interval * 3, 5)).known:
                    stream.cancel()
                    return
            except grpc.RpcError:
                stream.cancel()
                return

    def _channel(self) -> grpc.Channel:
        if self.insecure:
            return grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        return grpc.secure_channel(self.target, channel_credentials(self.creds), options=CHANNEL_OPTIONS)


def _status_name(status: int) -> str:
    """A PushReply status by name; a newer coordinator's status this client does not know, by number."""
    try:
        return pb.PushReply.Status.Name(status).lower()
    except ValueError:
        return f"status {status}"


def _version() -> str:
    try:
        return metadata.version("fedadapt")
    except metadata.PackageNotFoundError:
        return "unknown"
