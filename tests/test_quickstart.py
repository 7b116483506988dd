"""The shipped quickstart (real MiniLM, real Shakespeare roles) is reproducible to the bit."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def test_quickstart_twice_gives_identical_adapters(tmp_path):
    finals = []
    for name in ("first", "second"):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, "-m", "fedadapt", "simulate", "simulations/quickstart.toml",
                               "--set", "rounds=2", "--set", "seed=3", "--out", str(out)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "round   2/2" in proc.stdout
        finals.append(load_file(out / "model.safetensors"))
    a, b = finals
    assert a.keys() == b.keys() and len(a) == 26  # 6 layers x (query, value) x (A, B) + head weight and bias
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and training did move the adapter away from LoRA's B = 0 start
    assert any(k.endswith("lora_B.default.weight") and a[k].abs().sum() > 0 for k in a)
