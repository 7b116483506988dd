"""Flower interop (fedadapt.flower): a strategy run through Flower's simulation runtime equals the same run in
fedadapt's simulator, bit for bit; uploads arriving through Flower pass the engine's own checks.

The Flower side runs in benchmarks/.venv-flower (created on first use, a few minutes) with this checkout
overlaid, which keeps Flower and Ray out of the project venv: see benchmarks/flower_env.py. The simulator
side runs here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from chat import chat_file, chat_toml, tiny_lm  # tests/chat.py
from deploy import REPO, lora_run_toml, tiny_text_file  # tests/deploy.py

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def scenario(tmp_path: Path, strategy: str, clients_per_round: int) -> Path:
    """FLoRA-ready tiny Llama, one client per 'who' group (6 clients), 2-label text task."""
    data = tiny_text_file(tmp_path / "lines.jsonl", n_groups=6)
    path = tmp_path / f"{strategy}.toml"
    path.write_text(lora_run_toml(data, rounds=4, clients_per_round=clients_per_round,
                                  extra=f"[strategy]\n{strategy}"))
    return path


def test_flora_through_flower_simulation_is_bit_identical_to_fedadapt_simulator(simulate_both, tmp_path):
    # FLoRA: per-client ranks (per-node messages), catch-up of clients that missed rounds, exact stacking
    sim, fl, rows = simulate_both(scenario(tmp_path, 'name = "flora"\nranks = [2, 4]', clients_per_round=3), tmp_path)
    assert sim.keys() == fl.keys()
    for k in sim:  # client order is fixed (the engine aggregates in client-id order), so: bit-identical
        assert sim[k].dtype == fl[k].dtype and torch.equal(sim[k], fl[k]), k
    assert len(rows[0]) == len(rows[1]) == 4
    # Client-side catch-up counts may differ: in the simulator the server's per-round evaluation shares the
    # clients' model and so already brought its base up to date; the Flower clients' model lives in Ray's
    # actor and applies the stacks itself. The base it trains on is the same (base_hash, checked by clients).
    own = lambda r: {k: v for k, v in r["strategy"].items() if not k.startswith("catchup_")}  # noqa: E731
    for a, b in zip(*rows):  # the same clients, losses, bytes each way and FLoRA's own round metrics
        for key in ("round", "clients", "loss", "accuracy", "eval_loss", "bytes_up", "bytes_down", "rejected"):
            assert a[key] == b[key], (a["round"], key)
        assert own(a) == own(b) and b["strategy"]["base_hashes_distinct"] == 1.0, a["round"]
    assert max(r["strategy"]["catchup_stack_rounds"] + r["strategy"]["catchup_dense"] for r in rows[1]) > 0
    assert {r["strategy"]["global_rank"] for r in rows[1]} != {12.0}  # mixed ranks 2 and 4 were stacked
    sim_s, fl_s = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("sim", "flower"))
    assert sim_s["accuracy"] == fl_s["accuracy"] and sim_s["loss"] == fl_s["loss"]


def test_a_causal_lm_through_flower_simulation_is_bit_identical_to_fedadapt_simulator(simulate_both, tmp_path):
    # Fed-SB on a tiny GPT-2 (Conv1D layers): the causal-lm task, its init round and R averaging, through Flower
    cfg = tmp_path / "chat.toml"
    cfg.write_text(chat_toml(tiny_lm(tmp_path / "gpt2", "gpt2"), chat_file(tmp_path / "chats.jsonl"), rounds=3,
                             clients_per_round=3, strategy='name = "fedsb"\ninit_samples = 8', generate=0))
    sim, fl, rows = simulate_both(cfg, tmp_path)
    assert sim.keys() == fl.keys() and any(k.endswith("lorasb_R") for k in sim)
    assert all(torch.equal(sim[k], fl[k]) for k in sim)
    assert [r["perplexity"] for r in rows[0]] == [r["perplexity"] for r in rows[1]]
    assert json.loads((tmp_path / "flower" / "summary.json").read_text())["perplexity"] > 0


def test_uploads_through_flower_get_the_engines_checks(run_flower, tmp_path):
    cfg = scenario(tmp_path, 'name = "fedavg"', clients_per_round=6)
    r = run_flower([str(REPO / "tests" / "flower_inproc.py"), str(cfg)], timeout=300)
    assert r.returncode == 0, r.stdout[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    ids = out["ids"]
    assert out["asked"] == ids
    assert out["accepted"] == [ids[3], ids[5]]  # ids[3] claimed to be ids[4]: the node id decides, not the claim
    rej = out["rejected"]
    assert "has shape (3, 3), expected" in rej[ids[0]]
    assert "contains NaN or Inf" in rej[ids[1]]
    assert "stale result for round 7" in rej[ids[2]]
    assert "not valid JSON" in rej[ids[4]]
    assert out["metrics"]["clients"] == 2 and out["metrics"]["rejected"] == 4 and out["changed"]
    # federated evaluation: half of the 6 clients, metrics weighted by their example counts
    assert out["evaluate_asked"] == 3 and 0.0 <= out["evaluate"]["accuracy"] <= 1.0
    assert out["evaluate"]["num-examples"] > 0 and "loss" in out["evaluate"]
