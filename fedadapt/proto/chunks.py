"""Payloads on the wire: split into chunks under a header that carries the size and sha256 of the whole.

`split` / `framed` / `framed_upload` are used by senders; `Reassembler` by receivers, which treat every part
as hostile: the announced size is checked against the limit before anything is allocated, a chunk that
would overflow the announced size (or is smaller than the receiver's minimum without being the last) is
refused at once, and the digest is compared only when the last byte is in. Each chunk is copied into one
buffer of the announced size as it arrives (reserved, not touched: the process's resident memory grows
with the bytes that came, not with what a header claims) and hashed there, so the whole payload is never
joined at the end; a caller can run `add` on another thread than the one that receives, which overlaps
hashing and copying with receiving.

An upload may carry its digest in a last part instead of its header (`framed_upload`): the sender then
hashes each chunk after handing it to gRPC, while it is being sent, instead of hashing the whole payload
before its first byte.

The streaming RPCs use the codecs at the bottom instead of protobuf's for their parts: every part after
the first is a bare chunk, encoded by hand byte-for-byte as protobuf would encode it (so any protobuf
client or server still interoperates) but with one copy of the bytes instead of three, and decoded as a
zero-copy view. On a 100 MiB upload that is the difference between protobuf and the payload dominating.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from fedadapt.core.errors import PayloadError

from . import fedadapt_pb2 as pb

# Below gRPC's default 4 MiB message limit with room for framing, so no channel option has to be raised.
CHUNK_BYTES = 3 * 1024 * 1024
# The smallest chunk a coordinator takes except the last of a payload: per-message costs (a wake-up, a
# hash call, a copy) are paid per chunk, and 10,000 chunks of 2 bytes would cost seconds of CPU for nothing.
MIN_CHUNK_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = CHUNK_BYTES + 64 * 1024  # a part on the wire: one chunk and its header


def describe(data: bytes) -> pb.Payload:
    return pb.Payload(size=len(data), sha256=hashlib.sha256(data).digest())


def split(data: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """The chunks of `data` in order, as views (none for an empty payload)."""
    view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    for start in range(0, len(view), chunk_bytes):
        yield view[start:start + chunk_bytes]


def framed(part_type, header, data: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Any]:
    """The parts of one payload: a `part_type` message with the header and the first chunk (so a small
    payload is one message), then bare chunks, which `encode_part` frames."""
    chunks = split(data, chunk_bytes)
    yield part_type(header=header, chunk=bytes(next(chunks, b"")))
    yield from chunks


def framed_upload(header: pb.ResultHeader, data: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Any]:
    """An upload whose digest travels last: the header announces the size only (it is filled in here), each
    chunk is hashed after gRPC took it (while it is on its way), and a last part carries the sha256."""
    header.payload.CopyFrom(pb.Payload(size=len(data)))
    h = hashlib.sha256()
    chunks = split(data, chunk_bytes)
    first = next(chunks, b"")
    yield pb.ResultPart(header=header, chunk=bytes(first))
    h.update(first)
    for chunk in chunks:
        yield chunk
        h.update(chunk)
    yield pb.ResultPart(sha256=h.digest())


class Reassembler:
    """Collects the chunks announced by a `pb.Payload` header into one buffer and verifies it.

    `min_chunk_bytes`: every chunk but the one that completes the payload must be at least this long.
    `trailer_digest`: a header without a digest is taken, and `result` must then be given the digest that
    came last."""

    def __init__(self, header: pb.Payload, max_bytes: int, chunk_bytes: int = CHUNK_BYTES, *,
                 min_chunk_bytes: int = 0, trailer_digest: bool = False):
        if header.size > max_bytes:
            raise PayloadError(f"payload of {header.size} bytes exceeds the limit of {max_bytes} bytes")
        if len(header.sha256) != 32 and not (trailer_digest and not header.sha256):
            raise PayloadError("payload header has no valid sha256 digest")
        self._expected = header.sha256 or None
        self._size = header.size
        self._buf: memoryview | None = None  # made on the first byte: a header alone reserves nothing
        self._filled = 0
        self._hash = hashlib.sha256()
        self._chunk_bytes = chunk_bytes
        self._min_chunk = min(min_chunk_bytes, chunk_bytes)
        self._empty_left = 1  # the header may ride with an empty chunk; an endless stream of them is refused
        self._short = 0  # the size of a chunk below the minimum that did not complete the payload: the last, or refused

    @property
    def size(self) -> int:
        return self._size

    @property
    def received(self) -> int:
        return self._filled

    @property
    def complete(self) -> bool:
        return self._filled == self._size

    @property
    def digest_expected(self) -> bool:
        """True when the digest is still to come (in the upload's last part)."""
        return self._expected is None

    def add(self, chunk: bytes | memoryview) -> None:
        n = len(chunk)
        if not n:
            self._empty_left -= 1
            if self._empty_left < 0:
                raise PayloadError("payload sent with more than one empty chunk")
            return
        if n > self._chunk_bytes:
            raise PayloadError(f"chunk of {n} bytes exceeds the chunk limit of {self._chunk_bytes}")
        end = self._filled + n
        if end > self._size:
            raise PayloadError(f"payload overflows its announced size of {self._size} bytes")
        if self._short:  # a short chunk was not the last one
            raise PayloadError(f"chunk of {self._short} bytes is below the minimum of {self._min_chunk} bytes "
                               "(only the last chunk of a payload may be smaller)")
        if n < self._min_chunk and end != self._size:
            self._short = n
        if self._buf is None:
            # uninitialised: pages are reserved, and become resident only as chunks are copied in
            self._buf = memoryview(np.empty(self._size, dtype=np.uint8)).cast("B")
        self._buf[self._filled:end] = chunk
        self._hash.update(self._buf[self._filled:end])
        self._filled = end

    def result(self, digest: bytes | None = None) -> memoryview:
        """The verified payload; raises if it is short or its digest does not match. Writable, so that
        `codec.decode` can hand out its tensors as views instead of copies. `digest`: the one that came
        last, for a header that announced none."""
        if not self.complete:
            raise PayloadError(f"payload truncated: {self._filled} of {self._size} bytes arrived")
        expected = self._expected
        if expected is None:
            if digest is None:
                raise PayloadError("payload ended without its sha256 digest")
            if len(digest) != 32:
                raise PayloadError("payload digest is not a sha256 digest")
            expected = digest
        elif digest is not None:
            raise PayloadError("payload carries a second digest")
        if self._hash.digest() != expected:
            raise PayloadError("payload corrupted: sha256 does not match its header")
        buf, self._buf = self._buf, None
        return buf if buf is not None else memoryview(bytearray())


# ------------------------------------------------------------------ codecs of the streaming RPCs' parts
class Part(NamedTuple):
    """A received TaskPart / ResultPart: `header` on the first part of a payload only; `digest` on the
    last part of an upload whose header announced none."""

    header: Any | None
    chunk: bytes | memoryview
    digest: bytes | None = None
    error: str | None = None  # the part could not be decoded (hostile bytes): why


# Field 2 (`chunk`), length-delimited, in both TaskPart and ResultPart.
_CHUNK_TAG = 0x12


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_part(part: Any) -> bytes:
    """Serializer: a message as protobuf does it; a bare chunk as the message holding only that chunk."""
    if isinstance(part, (bytes, memoryview)):
        return b"".join((bytes((_CHUNK_TAG,)), _varint(len(part)), part))
    return part.SerializeToString()


def _bare_chunk(data: bytes) -> memoryview | None:
    """The chunk of a message that holds nothing but its chunk field, as a view; None for anything else."""
    if len(data) < 2 or data[0] != _CHUNK_TAG:
        return None
    n = shift = 0
    for i in range(1, min(len(data), 11)):  # a varint has at most 10 bytes
        n |= (data[i] & 0x7F) << shift
        shift += 7
        if not data[i] & 0x80:
            return memoryview(data)[i + 1:] if i + 1 + n == len(data) else None
    return None


def part_decoder(part_type) -> Callable[[bytes], Part]:
    """Deserializer for `part_type` messages: bare chunks without a copy, anything else through protobuf."""

    has_digest = "sha256" in part_type.DESCRIPTOR.fields_by_name

    def decode(data: bytes) -> Part:
        chunk = _bare_chunk(data)
        if chunk is not None:
            return Part(None, chunk)
        try:
            msg = part_type.FromString(data)
        except DecodeError:  # answered by the receiver (a refusal), not a traceback in gRPC's log
            return Part(None, b"", None, f"a part of {len(data)} bytes is not a {part_type.DESCRIPTOR.name}")
        return Part(msg.header if msg.HasField("header") else None, msg.chunk,
                    (msg.sha256 or None) if has_digest else None)

    return decode


class Malformed(NamedTuple):
    """A request that could not be decoded (what a tolerant deserializer gives the handler instead)."""

    error: str


def tolerant(message_type) -> Callable[[bytes], Any]:
    """Deserializer of `message_type` that returns `Malformed` for bytes that are not one, instead of raising
    (a raise would be answered UNKNOWN with a traceback in the server's log)."""

    def decode(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Malformed(f"the request is not a {message_type.DESCRIPTOR.name}")

    return decode


_SERVICE = "fedadapt.v1.Coordinator"


def add_coordinator(servicer, server: grpc.Server) -> None:
    """Serve the Coordinator service of `servicer`, with the chunk codecs on its two streams."""
    handlers = {
        "Join": grpc.unary_unary_rpc_method_handler(
            servicer.Join, tolerant(pb.JoinRequest), pb.JoinReply.SerializeToString),
        "Heartbeat": grpc.unary_unary_rpc_method_handler(
            servicer.Heartbeat, tolerant(pb.HeartbeatRequest), pb.HeartbeatReply.SerializeToString),
        "PullTask": grpc.unary_stream_rpc_method_handler(
            servicer.PullTask, tolerant(pb.PullRequest), encode_part),
        "PushResult": grpc.stream_unary_rpc_method_handler(
            servicer.PushResult, part_decoder(pb.ResultPart), pb.PushReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    server.add_registered_method_handlers(_SERVICE, handlers)


def pull_task(channel: grpc.Channel):
    """Client side of PullTask: yields `Part`s."""
    return channel.unary_stream(f"/{_SERVICE}/PullTask", request_serializer=pb.PullRequest.SerializeToString,
                                response_deserializer=part_decoder(pb.TaskPart), _registered_method=True)


def push_result(channel: grpc.Channel):
    """Client side of PushResult: takes `framed(pb.ResultPart, ...)`."""
    return channel.stream_unary(f"/{_SERVICE}/PushResult", request_serializer=encode_part,
                                response_deserializer=pb.PushReply.FromString, _registered_method=True)
