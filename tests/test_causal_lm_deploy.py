"""The causal-LM task through a real coordinator and client daemons on 127.0.0.1: a coordinator killed with
SIGKILL in the middle of a round resumes, and the final adapter equals the in-process simulation bit for bit;
`fedadapt run download` fetches it (with its config) into a run dir that `fedadapt export` takes."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from chat import chat_file, chat_toml, tiny_lm  # tests/chat.py
from deploy import Deployment
from safetensors.torch import load_file

from fedadapt.server.store import Store

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CLIENTS = ["c0", "c1", "c2"]


def test_kill9_coordinator_mid_round_resumes_a_causal_lm_run_bit_identical(tmp_path, reference):
    d = Deployment(tmp_path, f"sqlite:///{tmp_path / 'fedadapt.db'}")
    try:
        data = chat_file(tmp_path / "chats.jsonl", clients=3)
        toml = chat_toml(tiny_lm(tmp_path / "llama", "llama"), data, rounds=3, clients_per_round=3, generate=0,
                         extra="[coordinator]\nmin_clients = 3").replace("local_steps = 4", "local_steps = 60")
        for name in CLIENTS:
            d.add_client(name)
        coord = d.start_coordinator()
        clients = [d.start_client(name) for name in CLIENTS]
        run_id = d.submit(toml)
        coord.wait_for("round 1 committed", timeout=300)
        for c in clients:  # round 2 is under way: every daemon has its task
            c.wait_for("round 2: train task received", timeout=120)
        coord.kill(signal.SIGKILL)
        assert "round 2 committed" not in coord.text()

        coord2 = d.start_coordinator()
        info = d.wait_status(run_id, ("finished", "failed", "stopped"), timeout=600)
        assert info["status"] == "finished", (info, d.logs())
        assert "resumes after committed round 1" in coord2.text(), coord2.text()
        got, want = load_file(info["model_path"]), reference(toml)
        assert got.keys() == want.keys() and any("lora_A" in k for k in got)
        assert all(got[k].equal(want[k]) for k in got)
        with Store(d.db_url, d.data_dir) as store:  # nothing lost, nothing committed twice
            assert [r for r, _ in store.records(run_id)] == [1, 2, 3]
            records = dict(store.records(run_id))
        assert all(r["perplexity"] is not None and not r["rejected"] for r in records.values())

        # the run as files, through the Control service: what `export` needs, on another machine
        out = tmp_path / "downloaded"
        done = d.run("download", run_id, "--out", out)
        assert f"round 3: config.toml and model.safetensors written to {out}" in done.stdout
        assert (out / "config.toml").read_text() == toml
        assert (out / "model.safetensors").read_bytes() == Path(info["model_path"]).read_bytes()
        assert d.cli("export", out, "--format", "peft", "--out", tmp_path / "adapter").returncode == 0
        assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
        again = d.run("download", run_id, "--out", out, check=False)  # never mixes two downloads in one folder
        assert again.returncode == 2 and "exists and is not an empty folder" in again.stderr
        unknown = d.run("download", "run-00000000", "--out", tmp_path / "x", check=False)
        assert unknown.returncode == 2 and "no run 'run-00000000'" in unknown.stderr, unknown.stderr
        assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    finally:
        d.close()
