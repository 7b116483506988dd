"""FedEx-LoRA, FFA-LoRA and FlexLoRA through the Flower interop (fedadapt.flower): the same scenario in Flower's
simulation runtime and in fedadapt's simulator gives bit-identical models and round records. As in
tests/test_flower.py, the Flower side runs in benchmarks/.venv-flower with this checkout overlaid."""

from __future__ import annotations

import json

import pytest
import torch
from deploy import lora_run_toml, tiny_text_file  # tests/deploy.py
from safetensors.torch import load_file

from fedadapt.cli import main as fedadapt_main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STRATEGIES = {  # per-client ranks where the method has them: per-node messages and contracts
    "fedex-lora": 'name = "fedex-lora"\nranks = [4, 2]',
    "ffa-lora": 'name = "ffa-lora"',
    "flexlora": 'name = "flexlora"\nranks = [2, 4]',
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_through_flower_simulation_is_bit_identical_to_fedadapt_simulator(run_flower, tmp_path, name):
    data = tiny_text_file(tmp_path / "lines.jsonl", n_groups=6)
    cfg = tmp_path / "run.toml"
    cfg.write_text(lora_run_toml(data, rounds=4, clients_per_round=3, extra=f"[strategy]\n{STRATEGIES[name]}"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Flower side too (OMP_NUM_THREADS=1): the same kernels, the same bits
    try:
        assert fedadapt_main(["simulate", str(cfg), "--out", str(tmp_path / "sim")]) == 0
    finally:
        torch.set_num_threads(threads)
    r = run_flower(["-m", "fedadapt.flower.simulate", str(cfg), "--out", str(tmp_path / "flower")])
    assert r.returncode == 0, r.stdout[-4000:]

    sim, fl = load_file(tmp_path / "sim" / "model.safetensors"), load_file(tmp_path / "flower" / "model.safetensors")
    assert sim.keys() == fl.keys()
    for k in sim:
        assert sim[k].dtype == fl[k].dtype and torch.equal(sim[k], fl[k]), k
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("sim", "flower")]
    assert len(rows[0]) == len(rows[1]) == 4
    # catch-up counts may differ (in the simulator the server's evaluation shares the clients' model); the base
    # every client trained on is the same, which each client checks against the task's hash
    own = lambda r: {k: v for k, v in r["strategy"].items() if not k.startswith("catchup_")}
    for a, b in zip(*rows):
        for key in ("round", "clients", "loss", "accuracy", "eval_loss", "bytes_up", "bytes_down", "rejected"):
            assert a[key] == b[key], (a["round"], key)
        assert own(a) == own(b) and len(b["clients"]) == 3, a["round"]
    if name == "fedex-lora":
        assert all(r["strategy"]["base_hashes_distinct"] == 1.0 for r in rows[1])
        assert max(r["strategy"]["catchup_residual_rounds"] + r["strategy"]["catchup_dense"] for r in rows[1]) > 0
