"""A virtual client whose training produces NaN/Inf costs its result, not the simulation: its upload is
rejected by the engine with the reason and recorded in metrics.jsonl, the round aggregates the others."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
from nan_recipe import NaNFor  # tests/: the same diverging recipe test_executor.py runs on every path
from safetensors.torch import load_file

from fedadapt.core.config import load_config
from fedadapt.runtime.executor import Executor
from fedadapt.simulation import runner
from fedadapt.simulation.transport import InProcessTransport

BAD = "client-003"


def simulate(tmp_path, *sets, start=2):
    def transport(run, data, on_client_done):
        executor = Executor(run.model, NaNFor(run.recipe, data[BAD], start))
        return nullcontext(InProcessTransport(executor, data, on_client_done))

    out = tmp_path / "run"
    cfg = load_config("benchmarks/trivial.toml", ["rounds=4", "train.lr=0.5", "train.local_steps=3", *sets])
    runner.simulate(cfg, out, transport=transport)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "summary.json").read_text()), load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("strategy", ["fedavg", "median"])
def test_a_nan_client_is_rejected_and_the_run_goes_on(tmp_path, strategy):
    rows, summary, model = simulate(tmp_path, f"strategy.name={strategy}")
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert BAD in rows[0]["clients"] and rows[0]["rejected"] == {}  # round 1: honest
    for r in rows[1:]:
        assert set(r["rejected"]) == {BAD} and "local training diverged" in r["rejected"][BAD]
        assert "contains NaN or Inf" in r["rejected"][BAD]
        assert r["per_client"][BAD]["status"] == "rejected" and r["per_client"][BAD]["up"] > 0
        assert BAD not in r["clients"] and len(r["clients"]) == 9 and r["skipped"] is None
        assert all(v["status"] == "accepted" for c, v in r["per_client"].items() if c != BAD)
    assert all(bool(torch.isfinite(t).all()) for t in model.values())
    assert summary["accuracy"] > summary["majority_baseline"]


def test_an_attack_whose_forged_update_overflows_is_rejected_too(tmp_path):
    # scale x1e39 overflows float32 to Inf: each malicious client's forged upload is rejected, and BAD's
    # own NaN training (if it is malicious) leaves nothing to forge: neither stops the run
    rows, summary, model = simulate(tmp_path, "attack.kind=scale", "attack.fraction=0.3",
                                    "attack.scale=1e39", start=1)
    assert summary["malicious_clients"] == 3
    for r in rows:
        assert len(r["rejected"]) >= 3 and all("contains NaN or Inf" in why for why in r["rejected"].values())
        assert BAD in r["rejected"] and len(r["clients"]) == 10 - len(r["rejected"])
    assert all(bool(torch.isfinite(t).all()) for t in model.values())
