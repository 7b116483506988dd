"""Where a model trains and in what precision: `device` (auto | cpu | cuda | mps), `dtype` (fp32 | bf16 |
fp16) and an optional 4-bit or 8-bit frozen base (bitsandbytes, CUDA only: QLoRA).

Only training moves: adapters stay fp32 (peft creates LoRA weights in fp32 over a bf16/fp16 base), and what
travels and is aggregated is fp32 on the CPU (core/codec.py, strategies/).
"""

from __future__ import annotations

import torch

from fedadapt.core.errors import ModelError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZE = ("none", "4bit", "8bit")


def _cuda() -> bool:
    return torch.cuda.is_available()


def _mps() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA if present, else MPS if present, else the CPU. An explicit device that is not there is an
    error, not a silent fallback."""
    if name not in DEVICES:
        raise ModelError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if _cuda() else "mps" if _mps() else "cpu")
    if name == "cuda" and not _cuda():
        raise ModelError("device = 'cuda' but this machine has no CUDA GPU that torch can use (torch "
                         f"{torch.__version__}); use device = 'cpu' or 'auto'")
    if name == "mps" and not _mps():
        raise ModelError("device = 'mps' but the MPS backend (Apple silicon) is not available; use 'cpu' or 'auto'")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of the frozen base weights. bf16 on CUDA needs Ampere or newer."""
    if name not in DTYPES:
        raise ModelError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelError("dtype = 'bf16' is not supported by this GPU (it needs compute capability 8.0+); use 'fp16'")
    return dtype


def quantization(kind: str, device: torch.device, dtype: torch.dtype):
    """The transformers BitsAndBytesConfig for a 4/8-bit frozen base (None for `none`)."""
    if kind not in QUANTIZE:
        raise ModelError(f"quantize must be one of {', '.join(QUANTIZE)}, got {kind!r}")
    if kind == "none":
        return None
    if device.type != "cuda":
        raise ModelError(f"quantize = '{kind}' (a bitsandbytes base) needs a CUDA GPU; this run trains on "
                         f"{device.type}: use quantize = 'none'")
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it; say so in one line)
    except ImportError:
        raise ModelError(f"quantize = '{kind}' needs bitsandbytes: pip install 'fedadapt[gpu]'") from None
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    # the defaults are fp4, no double quantization and no compute dtype: QLoRA is all three set
    compute = dtype if dtype != torch.float32 else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def on_device(batch: tuple[dict[str, torch.Tensor], torch.Tensor], device: torch.device):
    """A batch (inputs, labels) moved to the model's device (a no-op on the CPU)."""
    inputs, labels = batch
    return {k: v.to(device) for k, v in inputs.items()}, labels.to(device)
