import struct

import pytest
import torch

from fedadapt.core import codec
from fedadapt.core.codec import TensorSpec
from fedadapt.core.errors import PayloadError


def test_round_trip_keeps_names_dtypes_values():
    t = {"a": torch.arange(6, dtype=torch.float64).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64),
         "c": torch.randn(4, 5).t()}  # non-contiguous
    out = codec.decode(codec.encode(t), contract=codec.contract_of(t))
    assert out.keys() == t.keys()
    for k in t:
        assert out[k].dtype == t[k].dtype and torch.equal(out[k], t[k])


def test_contract_violations_are_named():
    t = {"w": torch.zeros(2, 3)}
    data = codec.encode(t)
    with pytest.raises(PayloadError, match="'w' has shape"):
        codec.decode(data, contract={"w": TensorSpec((3, 2), torch.float32)})
    with pytest.raises(PayloadError, match="'w' has dtype"):
        codec.decode(data, contract={"w": TensorSpec((2, 3), torch.float64)})
    with pytest.raises(PayloadError, match="lacks tensor 'v'"):
        codec.decode(data, contract={"w": TensorSpec((2, 3), torch.float32), "v": TensorSpec((1,), torch.float32)})
    with pytest.raises(PayloadError, match="unexpected tensor 'w'"):
        codec.decode(data, contract={})


def test_a_range_dimension_accepts_exactly_its_lengths():
    contract = {"e": TensorSpec((range(2, 5), 2), torch.int32)}  # e.g. a sparse upload of 2 to 4 rows
    for n in (2, 3, 4):
        assert codec.decode(codec.encode({"e": torch.zeros(n, 2, dtype=torch.int32)}), contract=contract)["e"].shape == (n, 2)
    for shape in ((1, 2), (5, 2), (3, 3), (3,)):
        with pytest.raises(PayloadError, match=r"'e' has shape .*expected \(2\.\.4, 2\)"):
            codec.decode(codec.encode({"e": torch.zeros(shape, dtype=torch.int32)}), contract=contract)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rejected(bad):
    t = torch.zeros(3)
    t[1] = bad
    with pytest.raises(PayloadError, match="NaN or Inf"):
        codec.encode({"x": t})
    # a hostile peer does not use our encoder: build the bytes with safetensors directly
    from safetensors.torch import save

    with pytest.raises(PayloadError, match="NaN or Inf"):
        codec.decode(save({"x": t}))


def test_size_limit_checked_before_parsing():
    data = codec.encode({"x": torch.zeros(1000)})
    with pytest.raises(PayloadError, match="exceeds the limit"):
        codec.decode(data, max_bytes=len(data) - 1)


@pytest.mark.parametrize("hostile", [
    b"",
    b"\x00" * 7,
    b"not safetensors at all",
    struct.pack("<Q", 2**62) + b"{}",  # header length far beyond the data
    struct.pack("<Q", 10) + b"{not json}",
    struct.pack("<Q", 2) + b"{}" + b"\x00" * 3,  # trailing bytes no tensor accounts for? still a clean error or empty
])
def test_hostile_bytes_give_payload_error_not_crash(hostile):
    try:
        out = codec.decode(hostile)
    except PayloadError:
        return
    assert out == {}  # the only acceptable non-error: a well-formed empty payload


def test_offsets_pointing_outside_the_buffer_rejected():
    import json

    header = json.dumps({"x": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    hostile = struct.pack("<Q", len(header)) + header + b"\x00" * 16
    with pytest.raises(PayloadError):
        codec.decode(hostile)


def test_an_empty_tensor_with_huge_dimensions_is_refused_not_a_torch_error():
    """A 0 in the shape makes the tensor empty (0 bytes, offsets [0, 0]), but torch still computes its strides,
    which overflow for dimensions like these: found by hypothesis in tests/test_chunks.py."""
    header = b'{"0": {"dtype": "F64", "shape": [0, 3036988439, 3037012561], "data_offsets": [0, 0]}}'
    with pytest.raises(PayloadError, match="impossible shape"):
        codec.decode(struct.pack("<Q", len(header)) + header)


def test_not_bytes_rejected():
    with pytest.raises(PayloadError, match="must be bytes"):
        codec.decode("a string")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("pos", [0, 17, 999])
def test_a_single_non_finite_value_anywhere_is_refused(dtype, bad, pos):
    """The finiteness check is one min/max pass: it must still see one bad value in any position."""
    t = torch.randn(1000, dtype=torch.float64).to(dtype)
    codec.check_tensors({"w": t})
    t[pos] = bad
    with pytest.raises(PayloadError, match="NaN or Inf"):
        codec.check_tensors({"w": t})
    codec.check_tensors({"empty": torch.empty(0, 3, dtype=dtype)})
