"""Integration: a real coordinator process, client daemon processes and the Control CLI on 127.0.0.1,
on SQLite and on PostgreSQL (`db_url`). Each checks a real outcome: the final global adapter against
the in-process simulation of the same scenario and seed, or what the store committed.
"""

from __future__ import annotations

import signal

import pytest
import torch
from deploy import Deployment, lora_run_toml, tiny_text_file
from safetensors.torch import load_file

from fedadapt.server.store import Store

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CLIENTS = ["role0", "role1", "role2"]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def final_tensors(d: Deployment, run_id: str) -> dict[str, torch.Tensor]:
    info = d.wait_status(run_id, ("finished", "failed", "stopped"))
    assert info["status"] == "finished", (info, d.logs())
    return load_file(info["model_path"])


def test_three_daemons_equal_the_inprocess_simulation(deployment, data_file, reference):
    d = deployment
    for name in CLIENTS:
        d.add_client(name)
    d.start_coordinator()
    for name in CLIENTS:
        d.start_client(name)
    toml = lora_run_toml(data_file, extra='[strategy]\nname = "fedavg"')
    path = d.root / "run.toml"
    path.write_text(toml)
    follow = d.run("submit", path, "--follow", timeout=300)  # the CLI follows it live to the end
    assert "round 3" in follow.stdout and "finished" in follow.stdout, follow.stdout + d.logs()
    run_id = d.run("list", "--format", "json").stdout.split('"run_id": "')[1].split('"')[0]
    got = final_tensors(d, run_id)
    assert any("lora_A" in k for k in got)
    assert_same(got, reference(toml))


def test_kill9_coordinator_mid_round_resumes_bit_identical(deployment, data_file, reference):
    d = deployment
    for name in CLIENTS:
        d.add_client(name)
    coord = d.start_coordinator()
    clients = [d.start_client(name) for name in CLIENTS]
    toml = lora_run_toml(data_file, local_steps=40)  # long enough rounds to kill one in the middle
    run_id = d.submit(toml)
    coord.wait_for("round 1 committed", timeout=180)
    for c in clients:  # round 2 is under way: every client has its task
        c.wait_for("round 2: train task received", timeout=60)
    coord.kill(signal.SIGKILL)
    assert "round 2 committed" not in coord.text()

    coord2 = d.start_coordinator()
    got = final_tensors(d, run_id)
    assert "resumes after committed round 1" in coord2.text(), coord2.text()
    assert_same(got, reference(toml))
    with Store(d.db_url, d.data_dir) as store:  # nothing lost, nothing committed twice
        assert [r for r, _ in store.records(run_id)] == [1, 2, 3]
        assert {p.client for p in store.participations(run_id, 2) if p.status == "accepted"} == set(CLIENTS)


def test_killed_client_does_not_stall_the_round_and_rejoins(deployment, tmp_path):
    d = deployment
    names = CLIENTS + ["role3"]
    for name in names:
        d.add_client(name)
    coord = d.start_coordinator()
    clients = {name: d.start_client(name) for name in names}
    data_file = tiny_text_file(tmp_path / "four.jsonl", n_groups=4)
    run_id = d.submit(lora_run_toml(data_file, rounds=2, clients_per_round=4, min_clients=4, min_results=3,
                                    local_steps=40))
    victim = clients["role3"]
    victim.wait_for("round 1: train task received", timeout=180)
    victim.kill(signal.SIGKILL)
    coord.wait_for("round 1 committed", timeout=120)
    d.start_client("role3")  # back for round 2, which waits for 4 connected clients
    info = d.wait_status(run_id, ("finished", "failed"))
    assert info["status"] == "finished", d.logs()
    with Store(d.db_url, d.data_dir) as store:
        r1 = {p.client: p.status for p in store.participations(run_id, 1) if p.client == "role3"}
        r2 = {p.client: p.status for p in store.participations(run_id, 2)}
    assert r1 == {"role3": "failed"}
    assert r2 == {name: "accepted" for name in names}
