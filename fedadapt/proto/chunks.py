"""Payloads on the wire: split into chunks under a header that carries the size and sha256 of the whole.

`split` is used by senders; `Reassembler` by receivers, which treat every part as hostile: the
announced size is checked against the limit before anything is allocated, a chunk that would overflow
the announced size is refused at once, and the digest is compared only when the last byte is in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from fedadapt.core.errors import PayloadError

from . import fedadapt_pb2 as pb

# Below gRPC's default 4 MiB message limit with room for framing, so no channel option has to be raised.
CHUNK_BYTES = 3 * 1024 * 1024


def describe(data: bytes) -> pb.Payload:
    return pb.Payload(size=len(data), sha256=hashlib.sha256(data).digest())


def split(data: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The chunks of `data` in order (none for an empty payload)."""
    view = memoryview(data)
    for start in range(0, len(data), chunk_bytes):
        yield bytes(view[start:start + chunk_bytes])


def framed(part_type, header, data: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator:
    """The messages of one payload: the header rides with the first chunk, so a small payload is one message."""
    chunks = split(data, chunk_bytes)
    yield part_type(header=header, chunk=next(chunks, b""))
    for chunk in chunks:
        yield part_type(chunk=chunk)


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

    def result(self) -> bytes:
        """The verified payload; raises if it is short or its digest does not match."""
        if not self.complete:
            raise PayloadError(f"payload truncated: {self._filled} of {self._size} bytes arrived")
        if self._hash.digest() != self._expected:
            raise PayloadError("payload corrupted: sha256 does not match its header")
        data = b"".join(self._chunks)
        self._chunks = []
        return data
