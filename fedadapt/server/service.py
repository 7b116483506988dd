"""The coordinator's gRPC services: `Coordinator` for clients (backed by the ClientHub) and `Control` for
the CLI (backed by the RunManager), served by grpc.aio on one event-loop thread.

Bounded under abuse, with gRPC's own means where it has them:

- Every call is authenticated by a server interceptor from its metadata alone, before any message is read
  and before a handler runs; a refused call costs microseconds (the registry is in memory, registry.py).
- A stream holds no thread: a silent or slow one costs a coroutine, and the process keeps the same threads
  (the event loop, two payload workers, four control workers, gRPC's own) whatever the load.
- gRPC options bound the rest: the message size (one chunk and its header), concurrent RPCs
  (`maximum_concurrent_rpcs`, RESOURCE_EXHAUSTED beyond), streams per connection, keepalive, the age and
  idleness of connections and the time a connection has to complete its handshake.
- An upload is judged from its header before its payload is read (hub.admit: run, round, asked, already
  answered); then it has `Limits`: uploads in flight per client and in all, bytes buffered in all, the
  longest wait for its next part and a total time that grows with its announced size, and a minimum chunk
  size except for the last chunk.
- Chunks are copied and hashed on a worker thread while the next one is received (proto/chunks.py).

Every refusal is answered to the sender with its reason (PushReply REFUSED with a code, or a gRPC status
with one line), recorded and counted (telemetry.RefusalLog).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

import fedadapt
from fedadapt.core.errors import AuthError, FedadaptError, PayloadError
from fedadapt.privacy import secagg
from fedadapt.proto import fedadapt_pb2 as pb
from fedadapt.proto import fedadapt_pb2_grpc as pb_grpc
from fedadapt.proto.auth import NAME_KEY, TOKEN_KEY
from fedadapt.proto.chunks import (
    CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    MIN_CHUNK_BYTES,
    Malformed,
    Reassembler,
    add_coordinator,
    describe,
    framed,
)
from fedadapt.runtime.engine import MAX_EXAMPLES, ResultMessage
from fedadapt.server.hub import ACCEPTED, DUPLICATE, LATE, REFUSED, REJECTED, ClientHub, Verdict
from fedadapt.server.telemetry import RefusalLog, Stats

log = logging.getLogger("fedadapt.server")

Authenticate = Callable[[str, str], None]  # (name, token) -> None, or raises AuthError; called on the event loop
MAX_JSON = 64 * 1024  # capabilities and metrics are small; anything bigger is hostile
MAX_JSON_DIGITS = 1000  # an integer in client JSON; Python refuses to parse more than 4300 digits by raising
INLINE_BYTES = 256 * 1024  # smaller chunks are copied and hashed, smaller answers checked, on the event loop
HEARTBEAT_INTERVAL = 5.0  # the task stream itself reports a dead peer; heartbeats cover long silent training
_STATUS = {ACCEPTED: pb.PushReply.ACCEPTED, DUPLICATE: pb.PushReply.DUPLICATE, LATE: pb.PushReply.LATE,
           REJECTED: pb.PushReply.REJECTED, REFUSED: pb.PushReply.REFUSED}
_COORDINATOR, _CONTROL = "fedadapt.v1.Coordinator", "fedadapt.v1.Control"
_IDENTITY: contextvars.ContextVar[str] = contextvars.ContextVar("fedadapt_identity", default="")


@dataclass(frozen=True)
class Limits:
    """What one coordinator allows; the defaults suit a deployment of a few hundred clients."""

    max_payload_bytes: int
    uploads_per_client: int = 2  # uploads in flight per client (a retry may overlap the one it replaces)
    max_uploads: int = 1024  # uploads in flight in all (their bytes are bounded by buffer_bytes)
    buffer_bytes: int = 2 * 2**30  # payload bytes received and not yet filed, in all uploads together
    idle_s: float = 30.0  # the longest wait for the next part of an upload (or its header)
    min_rate: float = 256 * 1024  # bytes/s: an upload may take 60 s + its announced size at this rate
    min_chunk_bytes: int = MIN_CHUNK_BYTES
    max_rpcs: int = 20_000  # concurrent RPCs; beyond, gRPC answers RESOURCE_EXHAUSTED
    streams_per_connection: int = 32
    max_connections: int = 4096  # beyond, gRPC refuses new connections before their handshake
    connection_age_s: float = 3600.0  # then the client reconnects (GOAWAY), after a grace for open calls
    connection_age_grace_s: float = 600.0
    connection_idle_s: float = 300.0  # a connection with no call for this long is closed
    handshake_s: float = 10.0

    def upload_deadline(self, size: int) -> float:
        return 60.0 + size / self.min_rate


# ------------------------------------------------------------------------------------------ client JSON
class _JSONLimit(ValueError):
    pass


def _bounded_int(text: str) -> int:
    if len(text) > MAX_JSON_DIGITS:
        raise _JSONLimit(f"an integer of {len(text)} digits (at most {MAX_JSON_DIGITS})")
    return int(text)


def _json_object(text: str, what: str) -> dict[str, Any]:
    """A client's JSON object, parsed with limits: its size, the digits of an integer, the nesting depth."""
    if len(text) > MAX_JSON:
        raise PayloadError(f"{what} is larger than {MAX_JSON} bytes")
    try:
        value = json.loads(text or "{}", parse_int=_bounded_int)
    except _JSONLimit as exc:
        raise PayloadError(f"{what} has {exc}") from None
    except json.JSONDecodeError as exc:
        raise PayloadError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise PayloadError(f"{what} is nested too deeply") from None
    except ValueError as exc:  # whatever else the parser refuses
        raise PayloadError(f"{what} is not valid JSON: {str(exc)[:200]}") from None
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


# ------------------------------------------------------------------------------------------ authentication
class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call from its metadata before its handler runs or any message is read: client
    credentials for the Coordinator service, the admin credential for Control."""

    def __init__(self, client: Authenticate | None, admin: Authenticate | None, refusals: RefusalLog,
                 hub: ClientHub):
        self.client, self.admin, self.refusals, self.hub = client, admin, refusals, hub

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        service = details.method.split("/")[1] if details.method.count("/") >= 2 else ""
        check = self.client if service == _COORDINATOR else self.admin if service == _CONTROL else None
        md = dict(details.invocation_metadata or ())
        name = md.get(NAME_KEY, "")
        if check is not None:
            try:
                check(name, md.get(TOKEN_KEY, ""))
            except AuthError as exc:
                self.refusals.record(self.hub.run_id, self.hub.round, "", "unauthenticated", str(exc))
                return _deny(handler, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        _IDENTITY.set(name if isinstance(name, str) else "")
        return handler


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers `code` at once, reading nothing."""

    async def deny(request, context):
        await context.abort(code, details)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[bool(handler.request_streaming), bool(handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


# ------------------------------------------------------------------------------------------ Coordinator
class _Refuse(Exception):
    def __init__(self, code: str, reason: str, retry_after: float = 0.0):
        super().__init__(reason)
        self.code, self.reason, self.retry_after = code, reason, retry_after


class CoordinatorService:
    def __init__(self, hub: ClientHub, limits: Limits, refusals: RefusalLog, stats: Stats,
                 pool: futures.ThreadPoolExecutor, seen: Callable[[str], None] | None = None):
        self.hub = hub
        self.limits = limits
        self.refusals = refusals
        self.stats = stats
        self.pool = pool
        self.seen = seen or (lambda name: None)
        self._uploads: Counter[str] = Counter()  # in flight, per client (event-loop thread only)
        self._buffered = 0  # payload bytes of uploads in flight
        self._described: tuple[bytes, pb.Payload] | None = None  # the broadcast payload and its header

    @property
    def max_payload_bytes(self) -> int:
        return self.limits.max_payload_bytes

    async def _describe(self, payload: bytes) -> pb.Payload:
        """Size and sha256 of a task payload, hashed once per broadcast (every client of a round gets the
        same bytes object), on a worker thread."""
        last = self._described
        if last is None or last[0] is not payload:
            header = await asyncio.get_running_loop().run_in_executor(self.pool, describe, payload)
            last = self._described = (payload, header)
        return last[1]

    async def _session(self, session_id: str, context):
        name = _IDENTITY.get()
        s = self.hub.session(session_id)
        if s is None or s.name != name:
            self.refusals.record(self.hub.run_id, self.hub.round, name, "unknown-session", "unknown session",
                                 peer=context.peer())
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown session (the coordinator restarted?); join again")
        return s

    async def _well_formed(self, request, context) -> None:
        if isinstance(request, Malformed):
            self.refusals.record(self.hub.run_id, self.hub.round, _IDENTITY.get(), "malformed", request.error,
                                 peer=context.peer())
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)

    async def Join(self, request, context):
        await self._well_formed(request, context)
        name = _IDENTITY.get()
        if not name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{NAME_KEY} metadata is missing")
        try:
            caps = _capabilities(request.capabilities_json)
        except PayloadError as exc:
            self.refusals.record(self.hub.run_id, self.hub.round, name, "bad-capabilities", str(exc),
                                 peer=context.peer())
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        s = self.hub.join(name, caps)
        self.seen(name)
        log.info("client %s joined (fedadapt %s) from %s", name, request.version[:40] or "?", context.peer())
        return pb.JoinReply(session=s.session_id, heartbeat_interval_s=HEARTBEAT_INTERVAL, chunk_bytes=CHUNK_BYTES,
                            min_chunk_bytes=self.limits.min_chunk_bytes, digest_trailer=True)

    async def Heartbeat(self, request, context):
        await self._well_formed(request, context)
        name = _IDENTITY.get()
        s = self.hub.session(request.session)
        self.seen(name)
        return pb.HeartbeatReply(known=s is not None and s.name == name and not s.closed)

    async def PullTask(self, request, context):
        await self._well_formed(request, context)
        s = await self._session(request.session, context)
        self.hub.attach(s)
        try:
            with self.stats.stream("pull"):
                while True:
                    task = await self.hub.next_task_async(s)
                    if task is None:
                        break
                    header = pb.TaskHeader(run_id=self.hub.run_id, round=task.round, kind=task.kind,
                                           config_json=json.dumps(task.config), run_spec_json=self.hub.run_spec_json,
                                           payload=await self._describe(task.payload))
                    for part in framed(pb.TaskPart, header, task.payload):
                        yield part
                    self.stats.inc("bytes_sent", len(task.payload))
        finally:
            self.hub.detach(s)
        if s.why_closed in ("revoked", "its token was replaced"):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"client {s.name!r} is {s.why_closed}")

    async def PushResult(self, request_iterator, context):
        name = _IDENTITY.get()
        with self.stats.stream("push"):
            up = _Upload(self, name, context.peer())
            try:
                verdict = await up.receive(request_iterator.__aiter__(), context)
            except _Refuse as exc:
                verdict = Verdict(REFUSED, exc.reason, exc.code, exc.retry_after)
                self.refusals.record(self.hub.run_id, self.hub.round, name, exc.code, exc.reason, up.received,
                                     peer=context.peer())
                self.hub.stats[REFUSED] += 1
            except asyncio.CancelledError:  # the client went away mid-upload: always recorded this one way
                self.refusals.record(self.hub.run_id, self.hub.round, name, "incomplete", up.incomplete(),
                                     up.received, peer=context.peer())
                raise
            finally:
                up.release()
            self.stats.inc("uploads", label=verdict.status)
            return pb.PushReply(status=_STATUS[verdict.status], reason=verdict.reason, code=verdict.code,
                                retry_after_s=verdict.retry_after)


class _Upload:
    """One PushResult: reads the header, asks the hub, then the payload under the limits."""

    def __init__(self, service: CoordinatorService, name: str, peer: str):
        self.svc, self.name, self.peer = service, name, peer
        self.round = 0
        self.received = 0
        self.size = 0
        self._counted = False  # in the per-client and global counts of uploads in flight
        self._buffered = 0

    def incomplete(self) -> str:
        if not self.size and not self.received:
            return (f"no header arrived: the upload ended, or its first message was over the "
                    f"{MAX_MESSAGE_BYTES} byte limit")
        if self.size and self.received >= self.size:
            return f"the upload was cancelled after all {self.size} bytes arrived"
        return f"payload truncated: {self.received} of {self.size} bytes arrived (the upload ended or was cancelled)"

    async def _next(self, parts, deadline: float):
        """The next part, None at the end of the stream; refused when nothing comes for `idle_s` ("idle") or
        the upload's total time is over ("too-slow")."""
        limits = self.svc.limits
        total = deadline - time.monotonic()
        wait = min(limits.idle_s, total)
        if wait <= 0 or self.size and total <= 0:
            raise _Refuse("too-slow", f"the upload took longer than its {limits.upload_deadline(self.size):.0f}s "
                                      f"limit ({self.received} of {self.size} bytes arrived)")
        try:
            async with asyncio.timeout(wait):  # no task per part, unlike wait_for
                return await parts.__anext__()
        except StopAsyncIteration:
            return None
        except TimeoutError:
            if wait < limits.idle_s:
                raise _Refuse("too-slow", f"the upload took longer than its "
                                          f"{limits.upload_deadline(self.size):.0f}s limit "
                                          f"({self.received} of {self.size} bytes arrived)") from None
            what = f"({self.received} of {self.size} bytes arrived)" if self.size else "(no header came)"
            raise _Refuse("idle", f"nothing arrived for {limits.idle_s:g}s {what}") from None

    async def receive(self, parts, context) -> Verdict:
        svc, limits, hub = self.svc, self.svc.limits, self.svc.hub
        start = time.monotonic()
        first = await self._next(parts, start + limits.idle_s + 1.0)
        if first is None:
            raise _Refuse("incomplete", self.incomplete())
        if first.error is not None:
            raise _Refuse("malformed", first.error)
        if first.header is None:
            svc.refusals.record(hub.run_id, hub.round, self.name, "no-header", "a result must start with its header",
                                len(first.chunk), peer=self.peer)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a result must start with its header")
        h = first.header
        self.round = h.round
        s = await svc._session(h.session, context)
        verdict = hub.admit(s, h.run_id, h.round)  # before any byte of the payload is read
        if verdict is not None:
            if verdict.status == REFUSED:
                raise _Refuse(verdict.code, verdict.reason, verdict.retry_after)
            return verdict
        if h.num_examples > MAX_EXAMPLES:
            raise _Refuse("bad-header", f"num_examples must be at most {MAX_EXAMPLES}, got {h.num_examples}")
        try:
            metrics = _json_object(h.metrics_json, "metrics_json")
        except PayloadError as exc:
            raise _Refuse("bad-header", str(exc)) from None
        if svc._uploads[self.name] >= limits.uploads_per_client:
            raise _Refuse("busy-client", f"client {self.name!r} already has {limits.uploads_per_client} uploads in "
                                         "flight", retry_after=1.0)
        if sum(svc._uploads.values()) >= limits.max_uploads:
            raise _Refuse("busy", f"the coordinator has {limits.max_uploads} uploads in flight; retry",
                          retry_after=0.5)
        svc._uploads[self.name] += 1
        self._counted = True
        try:
            buf = Reassembler(h.payload, limits.max_payload_bytes, CHUNK_BYTES, min_chunk_bytes=limits.min_chunk_bytes,
                              trailer_digest=True)
        except PayloadError as exc:
            raise _Refuse("bad-payload", str(exc)) from None
        self.size = buf.size
        deadline = start + limits.upload_deadline(buf.size)
        loop = asyncio.get_running_loop()
        pending = None  # the previous chunk's copy and hash, on a worker thread while this one is received
        digest = None
        part = first
        try:
            while part is not None:
                if part.error is not None:
                    raise _Refuse("malformed", part.error)
                if part.header is not None and part is not first:
                    raise PayloadError("a second header inside one upload")
                if part.digest is not None:
                    if not buf.digest_expected or digest is not None or len(part.chunk):
                        raise PayloadError("a digest part where none belongs")
                    digest = part.digest
                elif digest is not None:
                    raise PayloadError("parts after the upload's digest")
                elif len(part.chunk) or part is first:
                    self._reserve(len(part.chunk))
                    if s.closed:
                        raise _Refuse("session-closed", f"session {s.why_closed}; join again")
                    if pending is not None:
                        await pending
                        pending = None
                    if len(part.chunk) < INLINE_BYTES:  # a worker thread costs more than the copy and hash
                        buf.add(part.chunk)
                    else:  # copied and hashed on a worker while the next part is received
                        pending = loop.run_in_executor(svc.pool, buf.add, part.chunk)
                else:
                    buf.add(part.chunk)  # an empty chunk: counted (one is allowed), nothing to copy
                part = await self._next(parts, deadline)
            if pending is not None:
                await pending
            payload = buf.result(digest)
        except PayloadError as exc:
            code = "incomplete" if "truncated" in str(exc) else "bad-payload"
            reason = self.incomplete() if code == "incomplete" else str(exc)
            raise _Refuse(code, reason) from None
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
        svc.stats.inc("bytes_received", len(payload))
        msg = ResultMessage(self.name, h.round, int(h.num_examples), metrics, payload)
        if len(payload) < INLINE_BYTES:  # checking a small payload takes less than handing it to a worker
            return hub.submit(s, msg, h.run_id)
        return await loop.run_in_executor(svc.pool, hub.submit, s, msg, h.run_id)

    def _reserve(self, n: int) -> None:
        svc = self.svc
        self.received += n
        if svc._buffered + n > svc.limits.buffer_bytes:
            raise _Refuse("busy", f"the coordinator holds {svc.limits.buffer_bytes // 2**20} MiB of uploads in "
                                  "flight; retry", retry_after=2.0)
        svc._buffered += n
        self._buffered += n

    def release(self) -> None:
        self.svc._buffered -= self._buffered
        self._buffered = 0
        if self._counted:
            self.svc._uploads[self.name] -= 1
            if self.svc._uploads[self.name] <= 0:
                del self.svc._uploads[self.name]
            self._counted = False


# ------------------------------------------------------------------------------------------ Control
class ControlService:
    """Thin gRPC face of the RunManager; user errors become INVALID_ARGUMENT / NOT_FOUND with one line. The
    manager's calls touch the database, so they run on the control workers, not on the event loop."""

    def __init__(self, manager, authenticate: Authenticate | None = None, pool: futures.Executor | None = None,
                 stats: Stats | None = None):
        self.manager = manager
        self.pool = pool
        self.stats = stats or Stats()

    async def _call(self, context, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        except FedadaptError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc).splitlines()[0] if str(exc) else "")

    async def SubmitRun(self, request, context):
        return await self._call(context, self.manager.submit, request.config_toml)

    async def ListRuns(self, request, context):
        return pb.RunList(runs=await self._call(context, self.manager.list))

    async def GetRun(self, request, context):
        return await self._call(context, self.manager.get, request.run_id)

    async def StopRun(self, request, context):
        return await self._call(context, self.manager.stop, request.run_id)

    async def ResumeRun(self, request, context):
        return await self._call(context, self.manager.resume, request.run_id)

    async def DownloadRun(self, request, context):
        """The run's config, then its latest committed model in CHUNK_BYTES parts, each file announced with its size
        and sha256 (the blob is read on a control worker one chunk at a time: memory stays one chunk)."""
        rnd, config, path = await self._call(context, self.manager.download, request.run_id)
        loop = asyncio.get_running_loop()
        data = config.encode()
        yield pb.RunFile(name="config.toml", size=len(data), sha256=hashlib.sha256(data).hexdigest(), round=rnd)
        yield pb.RunFile(chunk=data)
        digest = path.name  # blobs are stored under their sha256 (server/blobs.py)
        with self.stats.stream("download"), open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            yield pb.RunFile(name="model.safetensors", size=size, sha256=digest, round=rnd)
            while chunk := await loop.run_in_executor(self.pool, f.read, CHUNK_BYTES):
                self.stats.inc("bytes_sent", len(chunk))
                yield pb.RunFile(chunk=chunk)

    async def FollowRun(self, request, context):
        """Polls the manager every half second on a control worker (no thread waits between polls)."""
        state = await self._call(context, self.manager.follow_start, request.run_id)
        with self.stats.stream("follow"):
            while True:
                events, done = await self._call(context, self.manager.follow_poll, state)
                for ev in events:
                    yield ev
                if done:
                    return
                await asyncio.sleep(0.5)


# ------------------------------------------------------------------------------------------ the server
class Server:
    """The aio server on its own event-loop thread; `stop(grace)` returns an Event to `wait()` on, as a
    grpc.Server's does."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="grpc-loop", daemon=True)
        self.aio: grpc.aio.Server | None = None
        self.pools: list[futures.ThreadPoolExecutor] = []
        self.stopped = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro, timeout: float | None = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float | None = None) -> threading.Event:
        if self.aio is not None and not self.stopped.is_set():
            try:
                self.call(self.aio.stop(grace), timeout=(grace or 0) + 30)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(timeout=30)
                for pool in self.pools:
                    pool.shutdown(wait=False, cancel_futures=True)
                self.stopped.set()
        return self.stopped


def _pool(n: int, name: str) -> futures.ThreadPoolExecutor:
    """A pool whose `n` threads all exist from the start (so the process's thread count does not grow later)."""
    pool = futures.ThreadPoolExecutor(max_workers=n, thread_name_prefix=name)
    barrier = threading.Barrier(n)
    for f in [pool.submit(barrier.wait, 10) for _ in range(n)]:
        f.result()
    return pool


def serve(address: str, hub: ClientHub, manager=None, *, authenticate: Authenticate | None,
          admin_authenticate: Authenticate | None = None, credentials: grpc.ServerCredentials | None = None,
          max_payload_bytes: int, limits: Limits | None = None, refusals: RefusalLog | None = None,
          stats: Stats | None = None, seen: Callable[[str], None] | None = None) -> tuple[Server, int]:
    """Start the services on `address` (port 0 picks a free one); returns (server, port). `authenticate`
    and `admin_authenticate` run on the event loop for every call: they must be quick (registry.Registry)."""
    limits = limits or Limits(max_payload_bytes)
    stats = stats or Stats()
    refusals = refusals or RefusalLog(None, stats)
    stats.gauges.setdefault("connected_clients", ("clients with an open task stream", hub.connected))
    srv = Server()
    srv.pools = [_pool(2, "payload"), _pool(4, "control")]
    srv.thread.start()
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_concurrent_streams", limits.streams_per_connection),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.keepalive_time_ms", 20_000),  # find peers that vanished without closing their socket
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_connection_age_ms", int(limits.connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(limits.connection_age_grace_s * 1000)),
        ("grpc.max_connection_idle_ms", int(limits.connection_idle_s * 1000)),
        ("grpc.server_handshake_timeout_ms", int(limits.handshake_s * 1000)),
        ("grpc.so_reuseport", 0),
    ]

    async def start() -> int:
        server = grpc.aio.server(interceptors=[AuthInterceptor(authenticate, admin_authenticate, refusals, hub)],
                                 options=options, maximum_concurrent_rpcs=limits.max_rpcs)
        add_coordinator(CoordinatorService(hub, limits, refusals, stats, srv.pools[0], seen), server)
        if manager is not None:
            pb_grpc.add_ControlServicer_to_server(ControlService(manager, pool=srv.pools[1], stats=stats), server)
        try:
            port = (server.add_secure_port(address, credentials) if credentials is not None
                    else server.add_insecure_port(address))
        except RuntimeError as exc:
            raise FedadaptError(f"cannot listen on {address}: {exc}") from None
        if port == 0:
            raise FedadaptError(f"cannot listen on {address} (in use, or not an address of this machine)")
        await server.start()
        srv.aio = server
        return port

    try:
        port = srv.call(start())
    except BaseException:
        srv.loop.call_soon_threadsafe(srv.loop.stop)
        srv.thread.join(timeout=10)
        for pool in srv.pools:
            pool.shutdown(wait=False)
        raise
    return srv, port


def version() -> str:
    return getattr(fedadapt, "__version__", "0")
