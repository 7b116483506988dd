"""Tensor payloads on the wire: dict[str, Tensor] <-> safetensors bytes, never pickle.

Everything a peer sends is hostile until `decode` has checked it: the byte size first (before any
parsing), then the safetensors framing, then each tensor against the payload contract (names,
dtypes, shapes) and finiteness. Only then do tensors reach a strategy.

Decoding does not copy tensor data out of a writable buffer (what a receiver reassembles): the tensors
are views into it, so a coordinator aggregates straight from the bytes it received. safetensors' own
`load` copies every tensor, which cost the coordinator more than the aggregation itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import save as _st_save

from .errors import PayloadError

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
ALLOWED_DTYPES = FLOAT_DTYPES | {torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool}
# safetensors' names of the allowed dtypes; any other name in a header is refused as unsupported
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorSpec:
    """One entry of a payload contract. A dimension is a length, or a `range` of allowed lengths (uploads
    whose length varies per client, e.g. Ferret's sparse coordinates). `check` is the strategy's own test
    of the values (e.g. "is a permutation"): it returns why the tensor is invalid, or None."""

    shape: tuple[int | range, ...]
    dtype: torch.dtype
    check: Callable[[torch.Tensor], str | None] | None = None


Contract = Mapping[str, TensorSpec]


def contract_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The contract that `tensors` satisfy exactly (used to pin what clients must send back)."""
    return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in tensors.items()}


def encode(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise tensors; non-contiguous or non-CPU tensors are copied first."""
    check_tensors(tensors)
    return _st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def decode(
    data: bytes,
    *,
    contract: Contract | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, torch.Tensor]:
    """Parse and validate a payload; any defect raises PayloadError with one clear reason."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise PayloadError(f"payload of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    tensors = _views(data)
    check_tensors(tensors, contract)
    return tensors


def _views(data: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors buffer, as views into it when it is writable (else into one copy).

    The framing is held to the format: an 8-byte header length, a JSON object of entries with a known
    dtype, a shape and [start, end) offsets whose size matches the shape, tiling the data section with
    no gap, overlap or trailing byte.
    """
    buf = memoryview(data).cast("B") if memoryview(data).contiguous else memoryview(bytes(data))
    if buf.readonly:  # tensors must not alias an immutable object
        buf = memoryview(bytearray(buf))
    if len(buf) < 8:
        raise _framing("shorter than its 8-byte header length")
    n = int.from_bytes(buf[:8], "little")
    if n > len(buf) - 8:
        raise _framing(f"header of {n} bytes overruns the payload")
    try:
        header = json.loads(bytes(buf[8:8 + n]))
    except (ValueError, RecursionError):
        raise _framing("header is not JSON") from None
    if not isinstance(header, dict):
        raise _framing("header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _framing("__metadata__ must map names to strings")
    base, entries = 8 + n, []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _framing(f"entry {name!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = _ST_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
        if dtype is None:
            raise PayloadError(f"tensor {name!r} has unsupported dtype {info['dtype']!r}")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise _framing(f"entry {name!r} has a malformed shape or data_offsets")
        start, end = offsets
        if math.prod(d for d in shape if d) * dtype.itemsize >= 2**62:  # torch's strides would overflow int64, even
            raise _framing(f"tensor {name!r} has an impossible shape {shape}")  # for an empty tensor (a 0 dim)
        if end - start != math.prod(shape) * dtype.itemsize:
            raise _framing(f"tensor {name!r}: data_offsets span {end - start} bytes, its shape needs "
                           f"{math.prod(shape) * dtype.itemsize}")
        entries.append((start, end, name, dtype, shape))
    filled = 0
    for start, end, name, _, _ in sorted(entries, key=lambda e: e[:2]):
        if start != filled:
            raise _framing(f"tensor {name!r} starts at {start}, not at the end of the previous one ({filled})")
        filled = end
    if filled != len(buf) - base:
        raise _framing(f"the tensors cover {filled} of the {len(buf) - base} data bytes")
    return {name: _view(buf, base + start, end - start, dtype, shape) for start, end, name, dtype, shape in entries}


def _view(buf: memoryview, offset: int, nbytes: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset)
    if offset % dtype.itemsize:  # a hostile file may misalign a tensor; kernels expect alignment: copy it
        raw = raw.clone()
    return raw.view(dtype).view(shape)


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _framing(why: str) -> PayloadError:
    return PayloadError(f"payload is not valid safetensors: {why}")


def check_tensors(tensors: Mapping[str, torch.Tensor], contract: Contract | None = None) -> None:
    """Dtype whitelist, finiteness, and (if given) exact names, shapes and dtypes."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise PayloadError(f"tensor {name!r} is a {type(t).__name__}, not a tensor")
        if t.dtype not in ALLOWED_DTYPES:
            raise PayloadError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        if t.dtype in FLOAT_DTYPES and not _finite(t):
            raise PayloadError(f"tensor {name!r} contains NaN or Inf")
    if contract is None:
        return
    missing = sorted(set(contract) - set(tensors))
    extra = sorted(set(tensors) - set(contract))
    if missing:
        raise PayloadError(f"payload lacks tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise PayloadError(f"payload has unexpected tensor {extra[0]!r}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name, spec in contract.items():
        t = tensors[name]
        if not _fits(tuple(t.shape), tuple(spec.shape)):
            dims = [f"{d.start}..{d.stop - 1}" if isinstance(d, range) else str(d) for d in spec.shape]
            expected = f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"  # as a tuple prints
            raise PayloadError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {expected}")
        if t.dtype != spec.dtype:
            raise PayloadError(f"tensor {name!r} has dtype {t.dtype}, expected {spec.dtype}")
        if spec.check is not None and (reason := spec.check(t)):
            raise PayloadError(f"tensor {name!r} {reason}")


def _fits(shape: tuple[int, ...], expected: tuple[int | range, ...]) -> bool:
    return len(shape) == len(expected) and all(
        n in d if isinstance(d, range) else n == d for n, d in zip(shape, expected))


def _finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`, from one min/max pass: NaN propagates into both, and an Inf is the min or the
    max. Several times faster than `isfinite(t).all()`, which writes a bool tensor as large as `t`."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))
