"""A virtual client whose training produces NaN/Inf costs its result, not the simulation: its upload is
rejected by the engine with the reason and recorded in metrics.jsonl, the round aggregates the others."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from fedadapt.cli import main
from fedadapt.core import codec
from fedadapt.core.errors import PayloadError
from fedadapt.simulation import runner
from fedadapt.simulation.transport import InProcessTransport, client_upload

BAD = "client-003"


def test_client_upload_is_the_codec_for_finite_tensors_and_sends_nan_for_the_engine_to_reject():
    ok = {"w": torch.tensor([1.0, -2.0]), "n": torch.tensor([3], dtype=torch.int64)}
    assert client_upload(ok) == codec.encode(ok)
    for bad in (float("nan"), float("inf"), float("-inf")):
        payload = client_upload({"w": torch.tensor([1.0, bad]), "n": torch.tensor([3])})
        with pytest.raises(PayloadError, match="tensor 'w' contains NaN or Inf"):
            codec.decode(payload)
    with pytest.raises(PayloadError, match="unsupported dtype"):  # not a value problem: still a bug, still raised
        client_upload({"c": torch.tensor([1 + 1j])})


class NaNFor:
    """Wraps a recipe: the client holding `target` returns NaN tensors from round `start` on."""

    def __init__(self, inner, target, start: int):
        self.inner, self.target, self.start = inner, target, start

    def prepare(self, model, task):
        self.inner.prepare(model, task)

    def evaluate(self, model, data, task):
        return self.inner.evaluate(model, data, task)

    def train(self, model, data, task, privacy=None):
        result = self.inner.train(model, data, task)
        if data is self.target and task.round >= self.start:
            result = replace(result, tensors={k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                              for k, v in result.tensors.items()})
        return result


def simulate(tmp_path, monkeypatch, *sets, start=2):
    def transport(model, recipe, data, on_client_done):
        return InProcessTransport(model, NaNFor(recipe, data[BAD], start), data, on_client_done)

    monkeypatch.setattr(runner, "InProcessTransport", transport)
    out = tmp_path / "run"
    args = ["simulate", "benchmarks/trivial.toml", "--out", str(out), "--set", "rounds=4", "--set", "train.lr=0.5",
            "--set", "train.local_steps=3"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "summary.json").read_text()), load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("strategy", ["fedavg", "median"])
def test_a_nan_client_is_rejected_and_the_run_goes_on(tmp_path, monkeypatch, strategy):
    rows, summary, model = simulate(tmp_path, monkeypatch, f"strategy.name={strategy}")
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert BAD in rows[0]["clients"] and rows[0]["rejected"] == {}  # round 1: honest
    for r in rows[1:]:
        assert set(r["rejected"]) == {BAD} and "contains NaN or Inf" in r["rejected"][BAD]
        assert r["per_client"][BAD]["status"] == "rejected" and r["per_client"][BAD]["up"] > 0
        assert BAD not in r["clients"] and len(r["clients"]) == 9 and r["skipped"] is None
        assert all(v["status"] == "accepted" for c, v in r["per_client"].items() if c != BAD)
    assert all(bool(torch.isfinite(t).all()) for t in model.values())
    assert summary["accuracy"] > summary["majority_baseline"]


def test_an_attack_whose_forged_update_overflows_is_rejected_too(tmp_path, monkeypatch):
    # scale x1e39 overflows float32 to Inf: each malicious client's forged upload is rejected, and BAD's
    # own NaN training (if it is malicious) leaves nothing to forge: neither stops the run
    rows, summary, model = simulate(tmp_path, monkeypatch, "attack.kind=scale", "attack.fraction=0.3",
                                    "attack.scale=1e39", start=1)
    assert summary["malicious_clients"] == 3
    for r in rows:
        assert len(r["rejected"]) >= 3 and all("contains NaN or Inf" in why for why in r["rejected"].values())
        assert BAD in r["rejected"] and len(r["clients"]) == 10 - len(r["rejected"])
    assert all(bool(torch.isfinite(t).all()) for t in model.values())
