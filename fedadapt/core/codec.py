"""Tensor payloads on the wire: dict[str, Tensor] <-> safetensors bytes, never pickle.

Everything a peer sends is hostile until `decode` has checked it: the byte size first (before any
parsing), then the safetensors framing, then each tensor against the payload contract (names,
dtypes, shapes) and finiteness. Only then do tensors reach a strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from .errors import PayloadError

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
ALLOWED_DTYPES = FLOAT_DTYPES | {torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool}


@dataclass(frozen=True)
class TensorSpec:
    """One entry of a payload contract. `check` is the strategy's own test of the values (e.g. "is a
    permutation"): it returns why the tensor is invalid, or None."""

    shape: tuple[int, ...]
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
    try:
        tensors = _st_load(bytes(data))
    except Exception as exc:  # safetensors raises several types for malformed framing
        raise PayloadError(f"payload is not valid safetensors: {exc}") from None
    check_tensors(tensors, contract)
    return tensors


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
        if tuple(t.shape) != tuple(spec.shape):
            raise PayloadError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(spec.shape)}")
        if t.dtype != spec.dtype:
            raise PayloadError(f"tensor {name!r} has dtype {t.dtype}, expected {spec.dtype}")
        if spec.check is not None and (reason := spec.check(t)):
            raise PayloadError(f"tensor {name!r} {reason}")


def _finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`, from one min/max pass: NaN propagates into both, and an Inf is the min or the
    max. Several times faster than `isfinite(t).all()`, which writes a bool tensor as large as `t`."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def payload_size(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes `encode(tensors)` produces, for accounting without keeping the bytes."""
    return len(encode(tensors))
