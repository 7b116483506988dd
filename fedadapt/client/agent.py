"""The client daemon: join a coordinator, receive tasks on one long-lived stream, train, upload.

It survives the coordinator going away: every failure short of a refusal (unknown client, revoked,
wrong credential) ends the session, and the agent joins again with exponential backoff. A result
whose upload was interrupted is kept and uploaded first on the next session; the coordinator
de-duplicates it by (run, round, client). A task received again (the coordinator restarted before
committing the round) is answered from the kept result instead of training twice.
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
from fedadapt.proto.chunks import Reassembler, describe, framed, pull_task, push_result
from fedadapt.runtime.engine import TaskMessage
from fedadapt.runtime.executor import REFUSED, refusal

FATAL = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
                   ("grpc.keepalive_permit_without_calls", 1)]


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
            reply = stub.Join(pb.JoinRequest(capabilities_json=json.dumps(self.capabilities), version=_version()),
                              metadata=self._metadata, timeout=30)
            session = reply.session
            self.log(f"joined {self.target} as {self.creds.name!r}")
            if self._pending is not None:
                self._push(channel, session, self._pending)
            stream = pull_task(channel)(pb.PullRequest(session=session), metadata=self._metadata)
            self._stream = stream
            beat = threading.Thread(target=self._heartbeat, args=(stub, session, reply.heartbeat_interval_s, stream),
                                    daemon=True)
            beat.start()
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
                    upload = self._handle(header, buf.result())
                    self._pending = upload
                    self._push(channel, session, upload)
            except PayloadError as exc:  # a broken task stream: log it and start a fresh session
                self.log(f"dropped a malformed task: {exc}")
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED and self.stopped.is_set():
                    return True
                raise
            finally:
                stream.cancel()
                self._stream = None
        return True

    def _handle(self, header: pb.TaskHeader, payload: bytes) -> Upload:
        last = self._last
        if last is not None and (last.run_id, last.round, last.kind, last.config_json) == (
                header.run_id, header.round, header.kind, header.config_json):
            return last  # asked again after a coordinator restart: same inputs, same answer
        if self._workload is None or self._workload[0] != header.run_id:
            self._workload = None  # release the previous run's model first
            try:
                self._workload = (header.run_id, self.make_workload(json.loads(header.run_spec_json)))
            except FedadaptError as exc:  # this run, not the daemon: refuse its tasks, stay up
                self._workload = (header.run_id, exc)
        w = self._workload[1]
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
        header = pb.ResultHeader(session=session, run_id=up.run_id, round=up.round, num_examples=up.num_examples,
                                 metrics_json=json.dumps(up.metrics), payload=describe(up.payload))

        reply = push_result(channel)(framed(pb.ResultPart, header, up.payload), metadata=self._metadata)
        status = pb.PushReply.Status.Name(reply.status).lower()
        self.log(f"round {up.round}: uploaded {len(up.payload) / 1e6:.2f} MB, {status}"
                 + (f" ({reply.reason})" if reply.reason else ""))
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


def _version() -> str:
    try:
        return metadata.version("fedadapt")
    except metadata.PackageNotFoundError:
        return "unknown"
