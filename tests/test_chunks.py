"""Payload chunking (fedadapt/proto/chunks.py) and tensor decoding (fedadapt/core/codec.py) against
hostile input: every defect is a PayloadError, never another exception, and valid input round-trips
exactly. Unit tests pin the edges; hypothesis searches the rest."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from fedadapt.core import codec
from fedadapt.core.codec import ALLOWED_DTYPES, FLOAT_DTYPES, TensorSpec
from fedadapt.core.errors import PayloadError
from fedadapt.proto import fedadapt_pb2 as pb
from fedadapt.proto.chunks import CHUNK_BYTES, Reassembler, describe, encode_part, framed, part_decoder, split

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BIG = 1 << 20  # a max_bytes no generated payload reaches

payloads = st.binary(min_size=0, max_size=600)
chunk_sizes = st.integers(min_value=1, max_value=64)


def reassemble(header: pb.Payload, chunks, *, max_bytes: int = BIG, chunk_bytes: int = CHUNK_BYTES) -> bytes:
    """What a receiver does: header, every chunk, then the verified result."""
    r = Reassembler(header, max_bytes, chunk_bytes)
    for c in chunks:
        r.add(c)
    return r.result()


def assert_refused(header: pb.Payload, chunks, **kw) -> str:
    """The parts must be refused with a PayloadError (any other exception propagates and fails)."""
    with pytest.raises(PayloadError) as info:
        reassemble(header, chunks, **kw)
    return str(info.value)


# ---------------------------------------------------------------------------------- split / describe
def test_describe_carries_size_and_sha256():
    h = describe(b"hello")
    assert h.size == 5 and h.sha256 == hashlib.sha256(b"hello").digest() and len(h.sha256) == 32


@pytest.mark.parametrize("n, size, expect", [
    (0, 4, []),  # an empty payload has no chunks
    (1, 4, [1]),
    (4, 4, [4]),  # an exact multiple has no empty tail
    (8, 4, [4, 4]),
    (9, 4, [4, 4, 1]),
    (5, 1, [1] * 5),
])
def test_split_sizes(n, size, expect):
    data = bytes(range(n))
    chunks = list(split(data, size))
    assert [len(c) for c in chunks] == expect
    assert b"".join(chunks) == data
    assert all(isinstance(c, memoryview) for c in chunks)  # views of the payload, not copies


def test_default_chunk_fits_grpc_default_message_limit():
    assert CHUNK_BYTES < 4 * 1024 * 1024
    data = b"\x01" * (CHUNK_BYTES + 1)
    assert [len(c) for c in split(data)] == [CHUNK_BYTES, 1]
    assert reassemble(describe(data), split(data), max_bytes=len(data)) == data


@FAST
@given(data=payloads, size=chunk_sizes)
def test_any_bytes_split_and_reassemble_to_themselves(data, size):
    chunks = list(split(data, size))
    assert all(0 < len(c) <= size for c in chunks)
    assert len(chunks) == -(-len(data) // size)
    assert reassemble(describe(data), chunks, chunk_bytes=size) == data


@FAST
@given(n_chunks=st.integers(0, 8), size=chunk_sizes, seed=st.integers(0, 255))
def test_exact_multiples_of_the_chunk_size(n_chunks, size, seed):
    data = bytes((seed + i) % 256 for i in range(n_chunks * size))
    chunks = list(split(data, size))
    assert len(chunks) == n_chunks and all(len(c) == size for c in chunks)
    assert reassemble(describe(data), chunks, chunk_bytes=size) == data


# ---------------------------------------------------------------------------------- the Reassembler
def test_empty_payload_is_complete_at_once():
    r = Reassembler(describe(b""), max_bytes=0)
    assert r.complete and r.result() == b""


def test_progress_is_visible_through_complete():
    data = b"abcdef"
    r = Reassembler(describe(data), BIG, chunk_bytes=4)
    assert not r.complete
    r.add(b"abcd")
    assert not r.complete
    with pytest.raises(PayloadError, match="truncated: 4 of 6"):
        r.result()
    r.add(b"ef")
    assert r.complete and r.result() == data


def test_oversized_announcement_refused_before_allocation():
    # 2**62 bytes could never be allocated: a MemoryError (or an OOM kill) here would mean it was tried
    with pytest.raises(PayloadError, match="exceeds the limit of 1024 bytes"):
        Reassembler(pb.Payload(size=2**62, sha256=b"\x00" * 32), max_bytes=1024)
    with pytest.raises(PayloadError, match="exceeds the limit"):
        Reassembler(pb.Payload(size=2**64 - 1, sha256=b"\x00" * 32), max_bytes=2**40)


def test_limit_is_inclusive():
    data = b"x" * 100
    assert reassemble(describe(data), split(data, 10), max_bytes=100, chunk_bytes=10) == data
    with pytest.raises(PayloadError, match="exceeds the limit"):
        Reassembler(describe(data), max_bytes=99)


def test_chunk_bigger_than_the_chunk_limit_refused():
    data = b"y" * 10
    r = Reassembler(describe(data), BIG, chunk_bytes=4)
    with pytest.raises(PayloadError, match="exceeds the chunk limit of 4"):
        r.add(data)
    r.add(data[:4])  # the refused chunk left nothing behind
    r.add(data[4:8])
    r.add(data[8:])
    assert r.result() == data


@pytest.mark.parametrize("sha", [b"", b"\x00" * 31, b"\x00" * 33, b"\x00" * 64])
def test_bad_sha_length_refused(sha):
    with pytest.raises(PayloadError, match="sha256"):
        Reassembler(pb.Payload(size=3, sha256=sha), BIG)


def test_default_header_refused():
    # a header with no payload field at all: size 0 and an empty digest
    with pytest.raises(PayloadError):
        Reassembler(pb.Payload(), BIG)


def test_specific_defects_are_named():
    data = bytes(range(20))
    h = describe(data)
    chunks = list(split(data, 8))
    assert "corrupted" in assert_refused(h, [chunks[0], b"\xff" + chunks[1][1:], chunks[2]], chunk_bytes=8)
    assert "truncated" in assert_refused(h, chunks[:-1], chunk_bytes=8)
    assert "overflows" in assert_refused(h, [*chunks, b"!"], chunk_bytes=8)
    assert "overflows" in assert_refused(pb.Payload(size=19, sha256=h.sha256), chunks, chunk_bytes=8)
    assert "truncated" in assert_refused(pb.Payload(size=21, sha256=h.sha256), chunks, chunk_bytes=8)


def test_an_endless_stream_of_empty_chunks_is_refused():
    r = Reassembler(describe(b"abc"), BIG, chunk_bytes=4)
    with pytest.raises(PayloadError):
        for _ in range(10_000):
            r.add(b"")


def test_chunks_smaller_than_the_limit_are_accepted():
    """The protocol bounds chunks from above only ("chunks of at most CHUNK_BYTES", fedadapt.proto;
    JoinReply.chunk_bytes is "the largest chunk the coordinator sends or accepts"): a sender that uses
    smaller chunks than the receiver's limit is well-behaved and must not be refused."""
    data = bytes(range(256)) * 40  # 10 KiB
    for size in (4096, 1000, 1):
        assert reassemble(describe(data), split(data, size)) == data  # receiver limit: CHUNK_BYTES
        assert reassemble(describe(data), split(data, size), chunk_bytes=8192) == data


# ---------------------------------------------------------------------------------- framed (header + first chunk)
@FAST
@given(data=payloads, size=chunk_sizes)
def test_framed_parts_carry_the_header_with_the_first_chunk(data, size):
    header = pb.ResultHeader(run_id="r", round=3, num_examples=7, payload=describe(data))
    parts = list(framed(pb.ResultPart, header, data, size))
    assert len(parts) == max(1, -(-len(data) // size))
    assert parts[0].HasField("header") and parts[0].header == header
    assert all(isinstance(p, memoryview) and 0 < len(p) <= size for p in parts[1:])  # bare chunks, no copies
    # what a receiver does: the header's chunk first, then the rest, each through the wire codecs
    decode = part_decoder(pb.ResultPart)
    received = [decode(encode_part(p)) for p in parts]
    assert received[0].header == header and all(p.header is None for p in received[1:])
    r = Reassembler(received[0].header.payload, BIG, chunk_bytes=size)
    for p in received:
        r.add(p.chunk)
    assert r.result() == data


@FAST
@given(chunk=st.binary(min_size=0, max_size=300))
def test_hand_framed_chunk_is_protobufs_own_encoding(chunk):
    """Bare chunks are framed by hand; a protobuf peer must see exactly the message it would have built."""
    wire = encode_part(memoryview(chunk))
    assert pb.ResultPart.FromString(wire) == pb.ResultPart(chunk=chunk)
    if chunk:  # protobuf leaves an empty field out; the hand framing writes it, both decode the same
        assert wire == pb.ResultPart(chunk=chunk).SerializeToString()
    assert bytes(part_decoder(pb.TaskPart)(wire).chunk) == chunk


def test_chunk_views_survive_a_large_varint():
    chunk = bytes(range(256)) * 600  # a 3-byte length prefix
    part = part_decoder(pb.ResultPart)(encode_part(chunk))
    assert part.header is None and isinstance(part.chunk, memoryview) and part.chunk == chunk


@FAST
@given(wire=st.binary(min_size=0, max_size=64))
def test_part_decoder_on_garbage(wire):
    """Arbitrary bytes decode as protobuf would, or, where protobuf refuses them, as a part that says why (the
    receiver refuses the upload with that reason; a raise would be gRPC's UNKNOWN and a traceback); the hand
    path never yields a chunk protobuf would not."""
    try:
        expect = pb.ResultPart.FromString(wire)
    except Exception:  # protobuf refuses it: so must the decoder
        got = part_decoder(pb.ResultPart)(wire)
        assert got.error and "is not a ResultPart" in got.error and got.header is None and not got.chunk
        return
    got = part_decoder(pb.ResultPart)(wire)
    assert got.error is None
    assert bytes(got.chunk) == expect.chunk
    assert (got.header is None) == (not expect.HasField("header"))


def test_framed_empty_payload_is_one_message():
    header = pb.TaskHeader(run_id="r", round=1, payload=describe(b""))
    [only] = framed(pb.TaskPart, header, b"")
    assert only.HasField("header") and only.chunk == b""
    r = Reassembler(only.header.payload, 0)
    r.add(only.chunk)
    assert r.result() == b""


# ---------------------------------------------------------------------------------- hostile parts (property)
nonempty = st.binary(min_size=1, max_size=400)


@FAST
@given(data=nonempty, size=chunk_sizes, where=st.integers(min_value=0), bit=st.integers(0, 7))
def test_a_flipped_bit_is_refused(data, size, where, bit):
    i = where % len(data)
    bad = bytearray(data)
    bad[i] ^= 1 << bit
    assert "corrupted" in assert_refused(describe(data), list(split(bytes(bad), size)), chunk_bytes=size)


@FAST
@given(data=nonempty, size=chunk_sizes, which=st.integers(min_value=0))
def test_a_dropped_chunk_is_refused(data, size, which):
    chunks = list(split(data, size))
    del chunks[which % len(chunks)]
    assert "truncated" in assert_refused(describe(data), chunks, chunk_bytes=size)


@FAST
@given(data=payloads, size=chunk_sizes, extra=st.binary(min_size=1, max_size=64), where=st.integers(min_value=0))
def test_an_extra_chunk_is_refused(data, size, extra, where):
    chunks = list(split(data, size))
    chunks.insert(where % (len(chunks) + 1), extra[:size])
    assert "overflows" in assert_refused(describe(data), chunks, chunk_bytes=size)


@st.composite
def distinct_chunks(draw):
    size = draw(st.integers(1, 16))
    full = draw(st.lists(st.binary(min_size=size, max_size=size), min_size=2, max_size=8, unique=True))
    tail = draw(st.binary(min_size=0, max_size=size - 1))
    return size, full + ([tail] if tail else [])


@FAST
@given(parts=distinct_chunks(), shift=st.integers(min_value=1), perm=st.randoms(use_true_random=False))
def test_reordered_chunks_are_refused(parts, shift, perm):
    size, chunks = parts
    data = b"".join(chunks)
    k = 1 + shift % (len(chunks) - 1)
    moved = chunks[k:] + chunks[:k]  # a rotation is never the identity
    if perm.random() < 0.5:
        perm.shuffle(moved)
    assume(b"".join(moved) != data)
    assert list(split(data, size)) == chunks
    assert "corrupted" in assert_refused(describe(data), moved, chunk_bytes=size)


@FAST
@given(data=nonempty, size=chunk_sizes, cut=st.integers(min_value=1))
def test_truncated_bytes_are_refused(data, size, cut):
    short = data[:len(data) - 1 - cut % len(data)]  # at least one byte missing
    assert "truncated" in assert_refused(describe(data), list(split(short, size)), chunk_bytes=size)


@FAST
@given(data=payloads, size=chunk_sizes, delta=st.integers(-1000, 1000).filter(bool))
def test_a_wrong_announced_size_is_refused(data, size, delta):
    announced = len(data) + delta
    assume(announced >= 0)
    h = pb.Payload(size=announced, sha256=hashlib.sha256(data).digest())
    assert_refused(h, list(split(data, size)), chunk_bytes=size)


@FAST
@given(data=payloads, sha=st.binary(max_size=80).filter(lambda b: len(b) != 32))
def test_a_bad_sha_length_is_refused(data, sha):
    assert "sha256" in assert_refused(pb.Payload(size=len(data), sha256=sha), split(data))


@FAST
@given(data=payloads, sha=st.binary(min_size=32, max_size=32))
def test_a_wrong_digest_is_refused(data, sha):
    assume(sha != hashlib.sha256(data).digest())
    assert "corrupted" in assert_refused(pb.Payload(size=len(data), sha256=sha), split(data))


@FAST
@given(size=st.integers(min_value=0, max_value=2**64 - 1), limit=st.integers(0, 1 << 16))
def test_the_announced_size_is_checked_first(size, limit):
    h = pb.Payload(size=size, sha256=b"\x00" * 32)
    if size > limit:
        with pytest.raises(PayloadError, match="exceeds the limit"):
            Reassembler(h, limit)
    else:
        assert Reassembler(h, limit).complete == (size == 0)


@FAST
@given(data=payloads, size=st.integers(1, 16), big=st.integers(1, 64))
def test_any_oversized_chunk_is_refused(data, size, big):
    chunk = b"z" * (size + big)
    r = Reassembler(describe(data), BIG, chunk_bytes=size)
    with pytest.raises(PayloadError, match="chunk limit"):
        r.add(chunk)


@FAST
@given(header_size=st.integers(0, 300), sha=st.binary(max_size=40), chunks=st.lists(st.binary(max_size=80), max_size=8),
       limit=st.integers(0, 400), chunk_limit=st.integers(1, 80))
def test_arbitrary_parts_give_bytes_or_payload_error(header_size, sha, chunks, limit, chunk_limit):
    """Whatever a peer sends: the verified bytes, or a PayloadError. The result, when there is one, is
    exactly the concatenation of the chunks and matches the header."""
    h = pb.Payload(size=header_size, sha256=sha)
    try:
        out = reassemble(h, chunks, max_bytes=limit, chunk_bytes=chunk_limit)
    except PayloadError:
        return
    assert out == b"".join(chunks)
    assert len(out) == header_size <= limit and hashlib.sha256(out).digest() == sha
    assert all(len(c) <= chunk_limit for c in chunks)


# ---------------------------------------------------------------------------------- codec.decode
DTYPES = sorted(ALLOWED_DTYPES, key=str)
FLOATS = sorted(FLOAT_DTYPES, key=str)
shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)  # () is 0-dim; a 0 makes it empty
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz._0123456789", min_size=1, max_size=12).filter(
    lambda s: s != "__metadata__")


@st.composite
def tensors(draw, dtype=None, shape=None):
    dtype = draw(st.sampled_from(DTYPES)) if dtype is None else dtype
    shape = draw(shapes) if shape is None else shape
    n = 1
    for d in shape:
        n *= d
    if dtype == torch.bool:
        values = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    elif dtype in FLOAT_DTYPES:
        # finite in every float dtype (float16 tops out at 65504); conversion may round, never overflow
        values = draw(st.lists(st.floats(-6e4, 6e4, allow_nan=False, allow_infinity=False), min_size=n, max_size=n))
    else:
        info = torch.iinfo(dtype)
        values = draw(st.lists(st.integers(info.min, info.max), min_size=n, max_size=n))
    return torch.tensor(values, dtype=dtype).reshape(shape)


tensor_dicts = st.dictionaries(names, tensors(), min_size=0, max_size=4)


def bits(t: torch.Tensor) -> bytes:
    """The exact bytes of a tensor (distinguishes -0.0 from 0.0, which torch.equal does not)."""
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).tolist()) if t.numel() else b""


def decode_or_payload_error(data, **kw):
    try:
        return codec.decode(data, **kw)
    except PayloadError:
        return None


@SLOW
@given(ts=tensor_dicts)
def test_valid_encodings_round_trip_exactly(ts):
    data = codec.encode(ts)
    out = codec.decode(data, contract=codec.contract_of(ts), max_bytes=len(data))
    assert out.keys() == ts.keys()
    for k, t in ts.items():
        assert out[k].dtype == t.dtype and tuple(out[k].shape) == tuple(t.shape)
        assert torch.equal(out[k], t) and bits(out[k]) == bits(t), k


@SLOW
@given(ts=tensor_dicts)
def test_a_limit_one_byte_short_is_refused(ts):
    data = codec.encode(ts)
    with pytest.raises(PayloadError, match="exceeds the limit"):
        codec.decode(data, max_bytes=len(data) - 1)


@FAST
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_give_tensors_or_payload_error(data):
    out = decode_or_payload_error(data)
    if out is not None:
        assert isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in out.values())


@FAST
@given(ts=st.dictionaries(names, tensors(), min_size=1, max_size=3), where=st.integers(min_value=0),
       value=st.integers(0, 255))
def test_corrupted_valid_encodings_give_tensors_or_payload_error(ts, where, value):
    data = bytearray(st_save(ts))
    data[where % len(data)] = value
    out = decode_or_payload_error(bytes(data))
    if out is not None:
        assert isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in out.values())
        codec.check_tensors(out)  # whatever came through passed the whitelist and finiteness


SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
                      "C64", "U16", "U32", "U64", "F4", "E8M0", "XX", ""]


@st.composite
def forged_safetensors(draw):
    """Well-framed files with hostile headers: odd dtypes, shapes that disagree with the offsets,
    overlapping or out-of-range offsets, non-object entries, and random data bytes."""
    header = {}
    for name in draw(st.lists(names, max_size=3, unique=True)):
        shape = draw(st.lists(st.integers(0, 2**40) | st.integers(0, 4), max_size=3))
        start = draw(st.integers(0, 64))
        end = draw(st.integers(0, 96))
        entry = {"dtype": draw(st.sampled_from(SAFETENSORS_DTYPES)), "shape": shape, "data_offsets": [start, end]}
        header[name] = draw(st.sampled_from([entry, entry, entry, [], "x", 3, {"dtype": "F32"}]))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.sampled_from([{"a": "b"}, {"a": 1}, [], "m"]))
    text = json.dumps(header).encode()
    text += b" " * draw(st.integers(0, 8))
    declared = draw(st.sampled_from([len(text), len(text), len(text) + 1, max(len(text) - 1, 0), 2**63, 0]))
    body = draw(st.binary(max_size=96))
    return struct.pack("<Q", declared) + text + body


@FAST
@given(data=forged_safetensors())
def test_forged_headers_give_tensors_or_payload_error(data):
    out = decode_or_payload_error(data)
    if out is not None:
        codec.check_tensors(out)
        for t in out.values():
            assert t.dtype in ALLOWED_DTYPES


@SLOW
@given(t=st.sampled_from(FLOATS).flatmap(lambda d: tensors(dtype=d, shape=(3,))),
       bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]), where=st.integers(0, 2), name=names)
def test_non_finite_floats_are_refused(t, bad, where, name):
    t = t.clone()
    t[where] = bad
    data = st_save({name: t, "ok": torch.zeros(2)})  # a hostile peer does not use our encoder
    with pytest.raises(PayloadError, match="NaN or Inf"):
        codec.decode(data)
    with pytest.raises(PayloadError, match="NaN or Inf"):
        codec.decode(data, contract={name: TensorSpec((3,), t.dtype), "ok": TensorSpec((2,), torch.float32)})


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64, torch.uint16,
                                   torch.uint32, torch.uint64])
def test_dtypes_outside_the_whitelist_are_refused(dtype):
    data = st_save({"w": torch.zeros(2, dtype=dtype)})
    with pytest.raises(PayloadError, match="unsupported dtype"):
        codec.decode(data)


@SLOW
@given(ts=st.dictionaries(names, tensors(), min_size=1, max_size=3), pick=st.integers(min_value=0),
       new_name=names, data=st.data())
def test_contract_mismatches_are_refused(ts, pick, new_name, data):
    payload = codec.encode(ts)
    contract = codec.contract_of(ts)
    key = sorted(ts)[pick % len(ts)]
    spec = contract[key]

    # a name the contract does not know (and the one it expects missing)
    assume(new_name not in ts)
    renamed = {(new_name if k == key else k): v for k, v in contract.items()}
    with pytest.raises(PayloadError, match="lacks tensor|unexpected tensor"):
        codec.decode(payload, contract=renamed)
    # one tensor too many / too few
    with pytest.raises(PayloadError, match="unexpected tensor"):
        codec.decode(payload, contract={k: v for k, v in contract.items() if k != key})
    with pytest.raises(PayloadError, match="lacks tensor"):
        codec.decode(payload, contract={**contract, new_name: spec})
    # another shape
    other_shape = data.draw(shapes.filter(lambda s: s != spec.shape), label="shape")
    with pytest.raises(PayloadError, match="has shape"):
        codec.decode(payload, contract={**contract, key: TensorSpec(other_shape, spec.dtype)})
    # another dtype
    other_dtype = data.draw(st.sampled_from([d for d in DTYPES if d != spec.dtype]), label="dtype")
    with pytest.raises(PayloadError, match="has dtype"):
        codec.decode(payload, contract={**contract, key: TensorSpec(spec.shape, other_dtype)})
    # the contract itself is satisfied
    assert codec.decode(payload, contract=contract).keys() == ts.keys()


# ---------------------------------------------------------------------------------- zero-copy framing
def _reference(data: bytes):
    """safetensors' own loader (which copies): the framing verdict fedadapt's views must agree with."""
    from safetensors.torch import load as st_load
    try:
        return st_load(data)
    except Exception:
        return None


def assert_framing_agrees(data: bytes) -> None:
    ref = _reference(data)
    try:
        ours = codec._views(data)
    except PayloadError as exc:
        assert ref is None or any(t.dtype not in ALLOWED_DTYPES for t in ref.values()), (exc, ref)
        return
    assert ref is not None and ref.keys() == ours.keys()
    for k, t in ref.items():
        assert ours[k].dtype == t.dtype and ours[k].shape == t.shape and bits(ours[k]) == bits(t), k


@FAST
@given(data=forged_safetensors() | st.binary(max_size=120))
def test_framing_verdicts_agree_with_safetensors(data):
    assert_framing_agrees(data)


@SLOW
@given(ts=st.dictionaries(names, tensors(), min_size=1, max_size=3), where=st.integers(min_value=0),
       value=st.integers(0, 255))
def test_corrupted_framing_verdicts_agree_with_safetensors(ts, where, value):
    data = bytearray(st_save(ts))
    data[where % len(data)] = value
    assert_framing_agrees(bytes(data))


def test_a_writable_buffer_is_decoded_without_copying_and_bytes_are_not_aliased():
    t = torch.arange(6, dtype=torch.float32)
    received = bytearray(st_save({"w": t}))
    view = codec.decode(received)["w"]
    received[-4:] = struct.pack("<f", 42.0)  # the tensor is a view of the received buffer
    assert view[-1].item() == 42.0
    sent = st_save({"w": t})
    copy = codec.decode(sent)["w"]
    copy.zero_()  # a tensor decoded from immutable bytes owns its memory
    assert codec.decode(sent)["w"].equal(t)


def test_a_misaligned_tensor_is_decoded_exactly():
    """safetensors writes aligned files; a hostile one may not, and then that tensor is copied."""
    header = {"a": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [6, 14]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    a, b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16), torch.tensor([4.5, -1.0])
    data = struct.pack("<Q", len(text)) + text + bits(a) + bits(b)
    out = codec.decode(bytearray(data))
    assert out["a"].equal(a) and out["b"].equal(b)
