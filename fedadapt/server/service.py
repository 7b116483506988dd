"""The coordinator's gRPC services: `Coordinator` for clients (backed by the ClientHub) and `Control`
for the CLI (backed by the RunManager). Every call is authenticated before it touches any state, and
every payload is reassembled and verified (size, sha256) before the hub sees it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

import fedadapt
from fedadapt.core.errors import AuthError, FedadaptError, PayloadError
from fedadapt.privacy import secagg
from fedadapt.proto import fedadapt_pb2 as pb
from fedadapt.proto import fedadapt_pb2_grpc as pb_grpc
from fedadapt.proto.auth import NAME_KEY, TOKEN_KEY
from fedadapt.proto.chunks import CHUNK_BYTES, Reassembler, add_coordinator, describe, framed
from fedadapt.runtime.engine import MAX_EXAMPLES, ResultMessage
from fedadapt.server.hub import ACCEPTED, DUPLICATE, LATE, REJECTED, ClientHub, Event

log = logging.getLogger("fedadapt.server")

Authenticate = Callable[[str, str], None]  # (name, token) -> None, or raises AuthError
MAX_JSON = 64 * 1024  # capabilities and metrics are small; anything bigger is hostile
HEARTBEAT_INTERVAL = 5.0  # the task stream itself reports a dead peer; heartbeats cover long silent training
_STATUS = {ACCEPTED: pb.PushReply.ACCEPTED, DUPLICATE: pb.PushReply.DUPLICATE, LATE: pb.PushReply.LATE,
           REJECTED: pb.PushReply.REJECTED}


class CachedAuth:
    """Remembers successful checks for `ttl` seconds so that every upload and heartbeat does not cost a
    database query; a revocation takes effect within `ttl`. Failures are never cached."""

    def __init__(self, check: Authenticate, ttl: float = 5.0):
        self.check, self.ttl = check, ttl
        self._ok: dict[tuple[str, str], float] = {}

    def __call__(self, name: str, token: str) -> None:
        key = (name, hashlib.sha256(token.encode()).hexdigest())
        if time.monotonic() - self._ok.get(key, -math.inf) < self.ttl:
            return
        self.check(name, token)
        if len(self._ok) > 100_000:  # bounded under a flood of distinct valid tokens (there are few)
            self._ok.clear()
        self._ok[key] = time.monotonic()


def _identity(context: grpc.ServicerContext, authenticate: Authenticate | None, hub: ClientHub | None) -> str:
    md = dict(context.invocation_metadata())
    name, token = md.get(NAME_KEY, ""), md.get(TOKEN_KEY, "")
    if authenticate is None:
        return name
    try:
        authenticate(name, token)
    except AuthError as exc:
        log.warning("refused %s: %s", context.peer(), exc)
        if hub is not None:
            hub.stats["refused"] += 1
        context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
    return name


def _json_object(text: str, what: str) -> dict[str, Any]:
    if len(text) > MAX_JSON:
        raise PayloadError(f"{what} is larger than {MAX_JSON} bytes")
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise PayloadError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise PayloadError(f"{what} is nested too deeply") from None
    if not isinstance(value, dict):
        raise PayloadError(f"{what} must be a JSON object")
    return value


def _capabilities(text: str) -> dict[str, Any]:
    """A client's declared capabilities; the ones the coordinator computes with are type-checked here,
    so a hostile value is refused at Join instead of failing a round later."""
    caps = _json_object(text, "capabilities_json")
    n = caps.get("num_examples", 0)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_EXAMPLES:
        raise PayloadError(f"capabilities_json: num_examples must be an integer in [0, {MAX_EXAMPLES}]")
    if "secagg_key" in caps:  # the client's X25519 public key for secure aggregation (fedadapt.privacy.secagg)
        secagg.parse_public(caps["secagg_key"])
    return caps


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, hub: ClientHub, authenticate: Authenticate | None, max_payload_bytes: int):
        self.hub = hub
        self.authenticate = authenticate
        self.max_payload_bytes = max_payload_bytes
        self._described: tuple[bytes, pb.Payload] | None = None  # the broadcast payload and its header

    def _describe(self, payload: bytes) -> pb.Payload:
        """Size and sha256 of a task payload, hashed once per broadcast (every client of a round gets the
        same bytes object), not once per client."""
        last = self._described
        if last is None or last[0] is not payload:
            last = self._described = (payload, describe(payload))
        return last[1]

    def _session(self, session_id: str, context: grpc.ServicerContext):
        name = _identity(context, self.authenticate, self.hub)
        s = self.hub.session(session_id)
        if s is None or s.name != name:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown session (the coordinator restarted?); join again")
        return s

    def Join(self, request, context):
        name = _identity(context, self.authenticate, self.hub)
        if not name:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{NAME_KEY} metadata is missing")
        try:
            caps = _capabilities(request.capabilities_json)
        except PayloadError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        s = self.hub.join(name, caps)
        log.info("client %s joined (fedadapt %s) from %s", name, request.version or "?", context.peer())
        return pb.JoinReply(session=s.session_id, heartbeat_interval_s=HEARTBEAT_INTERVAL, chunk_bytes=CHUNK_BYTES)

    def PullTask(self, request, context):
        s = self._session(request.session, context)
        self.hub.attach(s)
        context.add_callback(lambda: self.hub.detach(s))  # fires the moment the client goes away
        try:
            while context.is_active():
                task = self.hub.next_task(s, timeout=1.0)
                if task is None:
                    if s.closed:
                        return
                    continue
                header = pb.TaskHeader(run_id=self.hub.run_id, round=task.round, kind=task.kind,
                                       config_json=json.dumps(task.config), run_spec_json=self.hub.run_spec_json,
                                       payload=self._describe(task.payload))
                yield from framed(pb.TaskPart, header, task.payload)
        finally:
            self.hub.detach(s)

    def PushResult(self, request_iterator, context):
        parts = iter(request_iterator)
        first = next(parts, None)
        if first is None or first.header is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a result must start with its header")
        h = first.header
        s = self._session(h.session, context)
        received = len(first.chunk)  # what a rejection records: the bytes that came, not the size announced
        try:
            if not 0 < h.num_examples <= MAX_EXAMPLES:
                raise PayloadError(f"num_examples must be in [1, {MAX_EXAMPLES}], got {h.num_examples}")
            metrics = _json_object(h.metrics_json, "metrics_json")
            buf = Reassembler(h.payload, self.max_payload_bytes)
            buf.add(first.chunk)
            for part in parts:
                if part.header is not None:
                    raise PayloadError("a second header inside one upload")
                received += len(part.chunk)
                buf.add(part.chunk)
            payload = buf.result()
        except PayloadError as exc:
            self.hub.record_event(Event(s.name, h.round, "rejected", str(exc), received))
            log.warning("rejected upload from %s for round %d: %s", s.name, h.round, exc)
            return pb.PushReply(status=pb.PushReply.REJECTED, reason=str(exc))
        status, reason = self.hub.submit(s, ResultMessage(s.name, h.round, h.num_examples, metrics, payload),
                                         h.run_id)
        return pb.PushReply(status=_STATUS[status], reason=reason)

    def Heartbeat(self, request, context):
        name = _identity(context, self.authenticate, self.hub)
        s = self.hub.session(request.session)
        return pb.HeartbeatReply(known=s is not None and s.name == name and not s.closed)


class ControlService(pb_grpc.ControlServicer):
    """Thin gRPC face of the RunManager; user errors become INVALID_ARGUMENT / NOT_FOUND with one line."""

    def __init__(self, manager, authenticate: Authenticate | None):
        self.manager = manager
        self.authenticate = authenticate

    def _call(self, context, fn, *args):
        _identity(context, self.authenticate, None)
        try:
            return fn(*args)
        except KeyError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        except FedadaptError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def SubmitRun(self, request, context):
        return self._call(context, self.manager.submit, request.config_toml)

    def ListRuns(self, request, context):
        return pb.RunList(runs=self._call(context, self.manager.list))

    def GetRun(self, request, context):
        return self._call(context, self.manager.get, request.run_id)

    def StopRun(self, request, context):
        return self._call(context, self.manager.stop, request.run_id)

    def ResumeRun(self, request, context):
        return self._call(context, self.manager.resume, request.run_id)

    def FollowRun(self, request, context):
        events = self._call(context, self.manager.follow, request.run_id, context.is_active)
        yield from events


def serve(address: str, hub: ClientHub, manager=None, *, authenticate: Authenticate | None,
          admin_authenticate: Authenticate | None = None, credentials: grpc.ServerCredentials | None = None,
          max_payload_bytes: int, max_workers: int = 512) -> tuple[grpc.Server, int]:
    """Start the services on `address` (port 0 picks a free one); returns (server, port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"), options=[
        ("grpc.keepalive_time_ms", 20_000),  # find peers that vanished without closing their socket
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ])
    add_coordinator(CoordinatorService(hub, authenticate, max_payload_bytes), server)
    if manager is not None:
        pb_grpc.add_ControlServicer_to_server(ControlService(manager, admin_authenticate), server)
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError as exc:
        raise FedadaptError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise FedadaptError(f"cannot listen on {address} (in use, or not an address of this machine)")
    server.start()
    return server, port


def version() -> str:
    return getattr(fedadapt, "__version__", "0")
