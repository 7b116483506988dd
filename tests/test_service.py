"""Integration: authentication, the Control CLI, very large payloads, and simulation over gRPC."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from deploy import Deployment, lora_run_toml, tiny_text_file
from safetensors.torch import load_file

from fedadapt.server.store import Store

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def deployment(tmp_path, db_url):
    d = Deployment(tmp_path, db_url)
    yield d
    d.close()


def test_unregistered_revoked_and_wrong_token_are_refused_on_both_sides(deployment):
    d = deployment
    good = d.add_client("alice")
    d.add_client("bob")
    d.cli("clients", "revoke", "bob", "--database", d.db_url)
    wrong = d.root / "alice-wrong"
    shutil.copytree(good, wrong)
    (wrong / "token").write_text("not-alices-token\n")
    stranger = d.cli("certs", "init", d.root / "other", "--clients", "carol").stdout  # credentials, never registered
    assert "carol" in stranger
    shutil.copy(d.certs / "ca.crt", d.root / "other" / "clients" / "carol" / "ca.crt")  # trust our coordinator
    coord = d.start_coordinator()

    cases = [("carol", d.root / "other" / "clients" / "carol", "client 'carol' is not registered"),
             ("bob", None, "client 'bob' is revoked"),
             ("alice", wrong, "wrong credential for client 'alice'")]
    for name, creds, message in cases:
        p = d.start_client(name, creds=creds, partition="0")
        assert p.wait(timeout=120) == 2, p.text()
        lines = [line for line in p.text().splitlines() if line.startswith("fedadapt: error:")]
        assert len(lines) == 1 and message in lines[0] and "refused" in lines[0], p.text()
        assert "Traceback" not in p.text()
        coord.wait_for(message)  # the coordinator's log says who was refused and why

    listing = json.loads(d.cli("clients", "list", "--database", d.db_url, "--format", "json").stdout)
    assert {c["name"]: bool(c["revoked"]) for c in listing} == {"alice": False, "bob": True}
    # the Control service takes only the admin credential
    r = d.cli("run", "list", "--coordinator", f"localhost:{d.port}", "--credentials", good, check=False)
    assert r.returncode == 2 and "wrong admin credential" in r.stderr


def test_control_cli_submit_list_stop_resume_follow(deployment, tmp_path):
    d = deployment
    data = tiny_text_file(tmp_path / "lines.jsonl", n_groups=2)
    for name in ("role0", "role1"):
        d.add_client(name)
    coord = d.start_coordinator()
    for name in ("role0", "role1"):
        d.start_client(name)
    run_id = d.submit(lora_run_toml(data, rounds=6, clients_per_round=2, min_clients=2, local_steps=30))
    coord.wait_for("round 2 committed", timeout=180)
    stopped = d.run("stop", run_id)
    assert "stopped" in stopped.stdout
    info = d.wait_status(run_id, ("stopped",))
    committed = info["round"]
    assert 2 <= committed < 6
    assert d.run("follow", run_id, check=False).returncode == 5  # a stopped run: exit code 5
    runs = json.loads(d.run("list", "--format", "json").stdout)
    assert [(r["run_id"], r["status"]) for r in runs] == [(run_id, "stopped")]

    d.run("resume", run_id)
    follow = d.run("follow", run_id, check=False)
    assert follow.returncode == 0, follow.stdout + follow.stderr + d.logs()
    assert f"round {committed + 1}" in follow.stdout and "finished" in follow.stdout
    with Store(d.db_url, d.data_dir) as store:
        assert [r for r, _ in store.records(run_id)] == list(range(1, 7))

    bad = d.root / "bad.toml"
    bad.write_text('rounds = 2\n[strategy]\nname = "no-such-strategy"\n')
    r = d.run("submit", bad, check=False)
    assert r.returncode == 2 and "unknown strategy 'no-such-strategy'" in r.stderr
    r = d.run("get", "run-00000000", check=False)
    assert r.returncode == 2 and "no run 'run-00000000'" in r.stderr


def test_unreachable_coordinator_is_exit_code_3(tmp_path):
    d = Deployment(tmp_path, "unused", tls=False)
    r = d.run("list", check=False, timeout=60)
    assert r.returncode == 3 and "not reachable" in r.stderr


def test_256_mib_payload_goes_up_and_down_intact(tmp_path):
    """A full-parameter MLP of 67.1M float32 parameters: 256 MiB each way, in 3 MiB chunks."""
    hidden = 1_813_750  # 37 * hidden + 4 parameters: the encoded payload is just under 256 MiB
    toml = f"""
name = "big"
seed = 3
rounds = 1
clients_per_round = 1
[model]
source = "mlp"
hidden = [{hidden}]
[adapter]
kind = "full"
[data]
dataset = "synthetic"
partition = "iid"
num_clients = 1
num_examples = 40
[train]
lr = 0.05
local_steps = 1
batch_size = 8
[eval]
max_examples = 8
"""
    d = Deployment(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", tls=False)
    try:
        d.add_client("client-000")
        coord = d.start_coordinator()
        client = d.start_client("client-000")
        run_id = d.submit(toml)
        info = d.wait_status(run_id, ("finished", "failed"), timeout=300)
        assert info["status"] == "finished", d.logs()
        with Store(d.db_url, d.data_dir) as store:
            [p] = store.participations(run_id, 1)
        assert p.status == "accepted"
        assert 255 * 2**20 < p.bytes_up <= 256 * 2**20 and 255 * 2**20 < p.bytes_down <= 256 * 2**20
        got = load_file(info["model_path"])
        assert "uploaded 268.4" in client.text()
        coord.kill()
        client.kill()
    finally:
        d.close()
    (tmp_path / "big.toml").write_text(toml)
    d.cli("simulate", tmp_path / "big.toml", "--out", tmp_path / "sim", "--threads", "1", timeout=300)
    want = load_file(tmp_path / "sim" / "model.safetensors")
    assert sum(t.numel() for t in got.values()) == 37 * hidden + 4
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_simulate_over_grpc_equals_inprocess(tmp_path):
    d = Deployment(tmp_path, "unused", tls=False)
    common = ["benchmarks/trivial.toml", "--threads", "1", "--set", "rounds=3", "--set", "seed=5"]
    d.cli("simulate", *common, "--out", tmp_path / "inprocess")
    out = d.cli("simulate", *common, "--out", tmp_path / "grpc", "--transport", "grpc").stdout
    assert "round   3/3" in out
    a, b = load_file(tmp_path / "inprocess" / "model.safetensors"), load_file(tmp_path / "grpc" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "grpc" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["bytes_up"] > 0 and len(r["clients"]) == 10 for r in rows)
