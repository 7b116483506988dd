"""models/device.py: device, dtype and quantization selection, with the accelerators faked (this CI has none)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from fedadapt.core.errors import ModelError
from fedadapt.models import device as dev


@pytest.fixture
def machine(monkeypatch):
    """`machine(cuda=..., mps=..., bf16=...)` fakes what torch reports."""
    def fake(cuda: bool = False, mps: bool = False, bf16: bool = True) -> None:
        monkeypatch.setattr(dev, "_cuda", lambda: cuda)
        monkeypatch.setattr(dev, "_mps", lambda: mps)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    return fake


def test_auto_prefers_cuda_then_mps_then_the_cpu(machine):
    for cuda, mps, want in ((True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")):
        machine(cuda=cuda, mps=mps)
        assert dev.resolve_device("auto").type == want
    assert dev.resolve_device("cpu").type == "cpu"


def test_an_explicit_device_that_is_not_there_is_a_one_line_error(machine):
    machine(cuda=False, mps=False)
    with pytest.raises(ModelError, match="device = 'cuda' but this machine has no CUDA GPU"):
        dev.resolve_device("cuda")
    with pytest.raises(ModelError, match="MPS backend"):
        dev.resolve_device("mps")
    with pytest.raises(ModelError, match="device must be one of"):
        dev.resolve_device("tpu")


def test_dtypes_and_bf16_needs_a_recent_gpu(machine):
    assert dev.resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    assert dev.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16  # runs on CPUs too (slower there)
    machine(cuda=True, bf16=False)
    with pytest.raises(ModelError, match="use 'fp16'"):
        dev.resolve_dtype("bf16", torch.device("cuda"))
    assert dev.resolve_dtype("fp16", torch.device("cuda")) == torch.float16


def test_quantized_bases_are_cuda_only_and_need_bitsandbytes(monkeypatch):
    assert dev.quantization("none", torch.device("cpu"), torch.float32) is None
    with pytest.raises(ModelError, match="needs a CUDA GPU"):
        dev.quantization("4bit", torch.device("cpu"), torch.float32)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ModelError, match=r"pip install 'fedadapt\[gpu\]'"):
        dev.quantization("4bit", torch.device("cuda"), torch.bfloat16)


def test_qlora_is_nf4_with_double_quantization_and_a_compute_dtype(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))  # present (faked)
    import transformers

    made = {}
    monkeypatch.setattr(transformers, "BitsAndBytesConfig", lambda **kw: made.update(kw) or kw)
    dev.quantization("4bit", torch.device("cuda"), torch.float32)
    assert made == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                    "bnb_4bit_compute_dtype": torch.bfloat16}  # transformers' defaults are fp4, no double quant
    made.clear()
    dev.quantization("8bit", torch.device("cuda"), torch.float16)
    assert made == {"load_in_8bit": True}
