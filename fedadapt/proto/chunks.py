"""Payloads on the wire: split into chunks under a header that carries the size and sha256 of the whole.

`split` is used by senders; `Reassembler` by receivers, which treat every part as hostile: the
announced size is checked against the limit before anything is allocated, a chunk that would overflow
the announced size is refused at once, and the digest is compared only when the last byte is in.

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

from fedadapt.core.errors import PayloadError

from . import fedadapt_pb2 as pb

# Below gRPC's default 4 MiB message limit with room for framing, so no channel option has to be raised.
CHUNK_BYTES = 3 * 1024 * 1024


def describe(data: bytes) -> pb.Payload:
    return pb.Payload(size=len(data), sha256=hashlib.sha256(data).digest())


def split(data: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """The chunks of `data` in order, as views (none for an empty payload)."""
    view = memoryview(data)
    for start in range(0, len(data), chunk_bytes):
        yield view[start:start + chunk_bytes]


def framed(part_type, header, data: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Any]:
    """The parts of one payload: a `part_type` message with the header and the first chunk (so a small
    payload is one message), then bare chunks, which `encode_part` frames."""
    chunks = split(data, chunk_bytes)
    yield part_type(header=header, chunk=bytes(next(chunks, b"")))
    yield from chunks


class Reassembler:
    """Collects the chunks announced by a `pb.Payload` header into one buffer and verifies it."""

    def __init__(self, header: pb.Payload, max_bytes: int, chunk_bytes: int = CHUNK_BYTES):
        if header.size > max_bytes:
            raise PayloadError(f"payload of {header.size} bytes exceeds the limit of {max_bytes} bytes")
        if len(header.sha256) != 32:
            raise PayloadError("payload header has no valid sha256 digest")
        self._expected = header.sha256
        self._size = header.size
        self._chunks: list[bytes] = []  # joined once at the end: one copy of the payload, not two
        self._filled = 0
        self._hash = hashlib.sha256()
        self._chunk_bytes = chunk_bytes
        self._empty_left = 1  # the header may ride with an empty chunk; an endless stream of them is refused

    @property
    def complete(self) -> bool:
        return self._filled == self._size

    def add(self, chunk: bytes) -> None:
        if not chunk:
            self._empty_left -= 1
            if self._empty_left < 0:
                raise PayloadError("payload sent with more than one empty chunk")
        if len(chunk) > self._chunk_bytes:
            raise PayloadError(f"chunk of {len(chunk)} bytes exceeds the chunk limit of {self._chunk_bytes}")
        end = self._filled + len(chunk)
        if end > self._size:
            raise PayloadError(f"payload overflows its announced size of {self._size} bytes")
        self._chunks.append(chunk)
        self._hash.update(chunk)
        self._filled = end

    def result(self) -> bytearray:
        """The verified payload; raises if it is short or its digest does not match. Writable, so that
        `codec.decode` can hand out its tensors as views instead of copies."""
        if not self.complete:
            raise PayloadError(f"payload truncated: {self._filled} of {self._size} bytes arrived")
        if self._hash.digest() != self._expected:
            raise PayloadError("payload corrupted: sha256 does not match its header")
        data = bytearray().join(self._chunks)
        self._chunks = []
        return data


# ------------------------------------------------------------------ codecs of the streaming RPCs' parts
class Part(NamedTuple):
    """A received TaskPart / ResultPart: `header` on the first part of a payload only."""

    header: Any | None
    chunk: bytes | memoryview


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

    def decode(data: bytes) -> Part:
        chunk = _bare_chunk(data)
        if chunk is not None:
            return Part(None, chunk)
        msg = part_type.FromString(data)
        return Part(msg.header if msg.HasField("header") else None, msg.chunk)

    return decode


_SERVICE = "fedadapt.v1.Coordinator"


def add_coordinator(servicer, server: grpc.Server) -> None:
    """Serve the Coordinator service of `servicer`, with the chunk codecs on its two streams."""
    handlers = {
        "Join": grpc.unary_unary_rpc_method_handler(
            servicer.Join, pb.JoinRequest.FromString, pb.JoinReply.SerializeToString),
        "Heartbeat": grpc.unary_unary_rpc_method_handler(
            servicer.Heartbeat, pb.HeartbeatRequest.FromString, pb.HeartbeatReply.SerializeToString),
        "PullTask": grpc.unary_stream_rpc_method_handler(
            servicer.PullTask, pb.PullRequest.FromString, encode_part),
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
