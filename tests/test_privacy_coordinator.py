"""Privacy through a real coordinator (issue 8): client daemons (separate processes, gRPC on 127.0.0.1)
run client DP-SGD with a ledger that survives a restart, and secure aggregation with their own keys.

The coordinator runs in this process (the same Store, ClientHub, RunManager and gRPC services as
`fedadapt server start`) so the test can see every upload it receives; the clients are real daemons.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import torch
from deploy import Deployment, lora_run_toml, tiny_text_file
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file
from sqlalchemy import create_engine, text

from fedadapt.client.state import ClientState
from fedadapt.core import codec
from fedadapt.core.errors import ConfigError, PayloadError
from fedadapt.privacy.ledger import Ledger
from fedadapt.proto import fedadapt_pb2 as pb
from fedadapt.proto import fedadapt_pb2_grpc as pb_grpc
from fedadapt.proto.auth import load_credentials, metadata
from fedadapt.server import certs
from fedadapt.server.hub import ClientHub
from fedadapt.server.runs import RunManager
from fedadapt.server.service import _capabilities, serve
from fedadapt.server.store import SCHEMA_VERSION, LedgerEntry, Store, StoreError, normalize_url
from fedadapt.strategies import private

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")
CLIENTS = ("role0", "role1", "role2")
FRAC_BITS = 24


@contextmanager
def coordinator(tmp_path: Path) -> Iterator[tuple[Deployment, Store, RunManager, list]]:
    """An insecure coordinator in this process with CLIENTS registered; yields (deployment for spawning
    daemons, store, run manager, every (run id, ResultMessage) the coordinator received)."""
    d = Deployment(tmp_path, f"sqlite:///{tmp_path / 'fedadapt.db'}", tls=False)
    store = Store(d.db_url, d.data_dir)
    for name in CLIENTS:
        creds = certs.token_credentials(tmp_path / "creds" / name, name)
        store.add_client(name, (creds / "token").read_text().strip())
    hub, received = ClientHub(), []
    submit = hub.submit

    def spy(session, msg, run_id):  # what the coordinator saw, exactly as it arrived
        received.append((run_id, msg))
        return submit(session, msg, run_id)

    hub.submit = spy
    manager = RunManager(store, hub)
    server, _ = serve(d.address, hub, manager, authenticate=store.check_client, max_payload_bytes=codec.DEFAULT_MAX_BYTES)
    manager.start()
    try:
        yield d, store, manager, received
    finally:
        d.close()
        manager.close()
        hub.shutdown()
        server.stop(grace=1.0).wait()
        store.close()


def wait_finished(d: Deployment, store: Store, run_id: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = store.get_run(run_id)
        if row.status in ("finished", "failed", "stopped"):
            assert row.status == "finished", f"{row.status}: {row.error}\n{d.logs()}"
            return
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} did not finish in {timeout}s:\n{d.logs()}")


def records(store: Store, run_id: str) -> list[dict]:
    return [r for _, r in store.records(run_id)]


# ------------------------------------------------------------------------------------------ secure aggregation
def test_secure_aggregation_through_the_coordinator_hides_every_update_and_keeps_the_average(tmp_path):
    """The same FedAvg-LoRA run, plain then with secure aggregation, on one coordinator and three daemons:
    the coordinator receives only int64 uploads that do not line up or correlate with any client's plain
    update, stores nothing per client but the aggregate, and ends within fixed-point error of the plain run."""
    data = tiny_text_file(tmp_path / "lines.jsonl", n_groups=3)
    plain_toml = lora_run_toml(data, rounds=2, clients_per_round=3, min_clients=3)
    with coordinator(tmp_path) as (d, store, manager, received):
        creds = load_credentials(tmp_path / "creds" / "role0")  # a Join with a malformed key: one-line refusal
        with pytest.raises(grpc.RpcError) as bad:
            pb_grpc.CoordinatorStub(d.channel()).Join(pb.JoinRequest(capabilities_json='{"secagg_key": "00ff"}'),
                                                      metadata=metadata(creds), timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "invalid public key" in bad.value.details()
        for name in CLIENTS:
            d.start_client(name, creds=tmp_path / "creds" / name)
        plain = manager.submit(plain_toml).run_id
        wait_finished(d, store, plain)
        masked = manager.submit(plain_toml + "[privacy]\nsecure_aggregation = true\n").run_id
        wait_finished(d, store, masked)

        for rec in records(store, masked):
            assert rec["clients"] == list(CLIENTS) and not rec["rejected"] and "secagg_discarded" not in rec["strategy"]
        got = load_file(store.model_path(masked))
        want = load_file(store.model_path(plain))
        for k, v in want.items():  # FedAvg of the unmasked sum: the plain average up to fixed-point rounding
            assert (got[k].double() - v.double()).abs().max() <= 1e-5, k

        uploads = {(run, m.client_id, m.round): m for run, m in received}
        for name in CLIENTS:  # round 1 trains from the same state in both runs: the same update, once masked
            clear, seen = uploads[plain, name, 1], uploads[masked, name, 1]
            clear_t, seen_t = codec.decode(clear.payload), codec.decode(seen.payload)
            assert seen_t.keys() == clear_t.keys() and all(t.dtype == torch.int64 for t in seen_t.values())
            flat_seen = torch.cat([seen_t[k].reshape(-1) for k in sorted(seen_t)])
            weighted = torch.cat([clear_t[k].reshape(-1).double() * clear.num_examples for k in sorted(clear_t)])
            as_fixed = flat_seen.double() / 2.0**FRAC_BITS
            # uniform masks: a correlation, or a mean of bits, is within 5 standard errors of chance (about 1 in
            # 3.5 million to fail by luck), while any leak of the update (correlation ~1) is far outside
            five_se = 5 / math.sqrt(as_fixed.numel())
            assert five_se < 0.5
            assert (as_fixed - weighted).abs().min() > 1.0  # no coordinate lines up with the weighted update
            assert abs(torch.corrcoef(torch.stack([as_fixed, weighted]))[0, 1]) < five_se
            assert abs(float(((flat_seen >> 62) & 1).double().mean()) - 0.5) < five_se / 2  # high bits uniform
            for other in CLIENTS:  # nor does it reveal another client's update
                o = uploads[plain, other, 1]
                w = torch.cat([codec.decode(o.payload)[k].reshape(-1).double() for k in sorted(seen_t)])
                assert abs(torch.corrcoef(torch.stack([as_fixed, w]))[0, 1]) < five_se

        # what the coordinator stored (tensor blobs, round records, strategy state): aggregates and bookkeeping,
        # nothing equal to one client's update (tensors on which clients barely differ are not individual)
        updates = [codec.decode(m.payload) for run, m in received if run == plain]
        individual = [k for k in updates[0] if max(float((u[k] - updates[0][k]).abs().max()) for u in updates) > 1e-3]
        assert individual
        blobs = [codec.decode(b.read_bytes(), max_bytes=1 << 30) for b in d.data_dir.rglob("*") if b.is_file()]
        for stored in blobs:
            for k in set(individual) & stored.keys():
                assert not any(torch.allclose(stored[k].double(), u[k].double(), atol=1e-5) for u in updates), k
        sizes = {(m.client_id, m.round): len(m.payload) for run, m in received if run == masked}
        assert {(p.client, p.round): (p.status, p.bytes_up) for p in store.participations(masked)} == {
            key: ("accepted", n) for key, n in sizes.items()}  # per client: its traffic, nothing of its content


def test_hostile_masked_uploads_are_rejected_before_the_round_and_the_round_is_discarded():
    from test_privacy import mlp_run

    assert pytest.raises(PayloadError, _capabilities, '{"secagg_key": "xyz"}').match("invalid public key")
    assert pytest.raises(PayloadError, _capabilities, '{"secagg_key": 7}').match("invalid public key")
    for corrupt in (lambda t: t.double(), lambda t: t.reshape(-1)[:-1]):  # wrong dtype; wrong length
        engine, _, _ = mlp_run(rounds=2, secure_aggregation=True)
        before = {k: v.clone() for k, v in engine.state.tensors.items()}
        inner_run = engine.transport.run

        def tampered(tasks, timeout, corrupt=corrupt, inner_run=inner_run):
            replies = inner_run(tasks, timeout=timeout)
            bad = {k: corrupt(v) for k, v in codec.decode(replies[0].payload).items()}
            replies[0].payload = codec.encode(bad)
            return replies

        engine.transport.run = tampered
        rec = engine.run_round(1)
        (who, why), = rec.rejected.items()
        assert "\n" not in why and ("dtype" in why or "shape" in why)
        assert rec.strategy["secagg_discarded"] == 1.0  # its masks are in the others' uploads
        assert all(torch.equal(before[k], v) for k, v in engine.state.tensors.items())


# ------------------------------------------------------------------------------------------ client DP
def opacus_epsilon(steps: int, z: float = 1.0, q: float = 1.0, delta: float = 1e-5) -> float:
    acc = RDPAccountant()
    for _ in range(steps):  # what opacus' optimizer hook does after each step
        acc.step(noise_multiplier=z, sample_rate=q)
    return acc.get_epsilon(delta)


def test_client_dp_through_the_coordinator_keeps_the_ledger_across_a_daemon_restart(tmp_path):
    """Three daemons under client DP (q = 1: every batch is a client's whole data). role2's ledger on disk
    is already at the budget for this run: it refuses, says why, is not asked again, and the run completes.
    role1 is killed (SIGKILL) after round 1 and restarted: its spent epsilon carries on from its ledger file.
    Every epsilon in the round metrics and in the coordinator's ledger table equals opacus' accountant.
    Rounds take a fraction of a second, so role1 may train a few more before the kill lands; the run is long
    enough that rounds remain for the restarted daemon (a round needs min_clients = 3 connected)."""
    steps, rounds = 2, 6  # per participation; rounds
    budget = opacus_epsilon((rounds + 1) * steps)  # room for every round
    data = tiny_text_file(tmp_path / "lines.jsonl", n_groups=3)
    toml = lora_run_toml(data, rounds=rounds, clients_per_round=3, min_clients=3, local_steps=steps)
    toml = toml.replace("batch_size = 4", "batch_size = 32") + (
        f'[privacy]\ndp = "client"\nepsilon = {budget!r}\nnoise_multiplier = 1.0\nmax_grad_norm = 1.0\n')
    with coordinator(tmp_path) as (d, store, manager, _):
        run_id = manager.submit(toml).run_id
        ClientState(tmp_path / "creds" / "role2").ledger_file(run_id).save(
            Ledger(budget, 1e-5, "rdp", [(1.0, 1.0, (rounds + 1) * steps)]))  # spent in an earlier life of this daemon
        procs = {name: d.start_client(name, creds=tmp_path / "creds" / name) for name in CLIENTS}
        deadline = time.monotonic() + 300  # generous: daemons start and import opacus first
        while store.get_run(run_id).round < 1:
            assert time.monotonic() < deadline, d.logs()
            time.sleep(0.1)
        procs["role1"].kill(signal.SIGKILL)
        restarted = d.start_client("role1", creds=tmp_path / "creds" / "role1")
        wait_finished(d, store, run_id, timeout=300)
        follow = d.run("follow", run_id, timeout=60).stdout

        recs = records(store, run_id)
        first = recs[0]["per_client"]["role2"]
        assert first["status"] == "rejected" and "privacy budget exhausted" in first["reason"]
        assert all("role2" not in r["per_client"] for r in recs[1:])  # the server stopped asking it
        assert [("role0" in r["clients"]) for r in recs] == [True] * rounds
        for k, r in enumerate(recs, start=1):  # role0 took part in every round: k participations
            assert r["strategy"][private.EPS_KEY + "role0"] == pytest.approx(opacus_epsilon(k * steps), rel=1e-9)
        ledger = store.privacy_ledger(run_id)
        assert {(e.round, e.client, e.epsilon) for e in ledger} == {
            (rnd, c, eps) for rnd, r in enumerate(recs, start=1) for c, eps in private.epsilon_metrics(r["strategy"]).items()}
        assert all(e.delta == 1e-5 for e in ledger) and "role2" not in {e.client for e in ledger}
        assert "epsilon" in follow

        # role1 trained before and after its restart; its last epsilon counts both lives
        before, after = (p.text().count(": train on ") for p in (procs["role1"], restarted))
        assert before >= 1 and after >= 1, d.logs()
        last = [e for e in ledger if e.client == "role1"][-1]
        saved = ClientState(tmp_path / "creds" / "role1").ledger_file(run_id).load()
        lives = sum(n for _, _, n in saved.history) // steps  # a run killed after its ledger save counts, unlogged
        assert before + after <= lives <= before + after + 1
        assert last.epsilon == pytest.approx(opacus_epsilon(lives * steps), rel=1e-9)
        assert math.isclose(saved.spent, last.epsilon, rel_tol=1e-12)


def test_the_ledger_commits_with_its_round_and_a_version_1_database_gains_the_table(db_url, tmp_path):
    t = {"w": torch.zeros(2)}
    with Store(db_url, tmp_path / "blobs") as s:
        run = s.create_run("r", "", 2)
        s.commit_round(run, 1, t, {}, {}, {}, [], [LedgerEntry("a", 0.5, 1e-5)])
        with pytest.raises(StoreError, match="epsilon must be finite"):
            s.commit_round(run, 2, t, {}, {}, {}, [], [LedgerEntry("a", math.nan, 1e-5)])
        (entry,) = s.privacy_ledger(run)
        assert entry == LedgerEntry("a", 0.5, 1e-5) and entry.round == 1 and s.get_run(run).round == 1
    engine = create_engine(normalize_url(db_url))  # make it a version-1 database: no ledger table
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE privacy_ledger"))
        conn.execute(text("UPDATE schema_version SET version = 1"))
    engine.dispose()
    with Store(db_url, tmp_path / "blobs") as s:
        assert s.schema_version() == SCHEMA_VERSION and s.privacy_ledger(run) == []


def test_the_ledger_file_is_per_run_and_refuses_to_start_over_when_damaged(tmp_path):
    state = ClientState(tmp_path)
    state.ledger_file("run-a").save(Ledger(3.0, 1e-5, "rdp", [(1.0, 0.5, 4)]))
    state.ledger_file("run-b").save(Ledger(3.0, 1e-5))
    assert state.ledger_file("run-a").load().history == [(1.0, 0.5, 4)] and state.ledger_file("run-c").load() is None
    assert state.secagg_key().public_key().public_bytes_raw() == state.secagg_key().public_key().public_bytes_raw()
    assert (tmp_path / "secagg.key").stat().st_mode & 0o077 == 0 and not list(tmp_path.glob(".*"))
    (tmp_path / "privacy-ledger.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        state.ledger_file("run-a").load()


def test_a_daemon_cap_spans_its_runs_calibrates_to_what_is_left_and_then_refuses(tmp_path):
    """`client start --max-epsilon E`: the epsilons of all the daemon's runs add up to at most E, whatever
    budget a run gives it, and a run without client DP is refused."""
    from test_privacy import Tiny, data

    from fedadapt.client.workload import _private_recipe
    from fedadapt.core.config import load_config_text
    from fedadapt.strategies.base import RunSettings, Task
    from fedadapt.strategies.registry import build

    spent = Ledger(8.0, 1e-5, "rdp", [(1.0, 0.5, 4)]).spent  # what an earlier run took
    state = ClientState(tmp_path, max_epsilon=spent + 0.5)
    state.ledger_file("run-a").save(Ledger(8.0, 1e-5, "rdp", [(1.0, 0.5, 4)]))
    cfg = load_config_text('[strategy]\nname = "fedavg"\n[privacy]\ndp = "client"\nepsilon = 8\n')
    inner = build({"name": "fedavg"}, RunSettings(0, 4, 1, {"lr": 0.1}))[1]
    recipe = _private_recipe(inner, cfg, "run-b", state)
    config = {"lr": 0.1, "local_steps": 2, "batch_size": 4, "seed": 1, "privacy_client": "me",
              "privacy": {"epsilon": 8.0, "delta": 1e-5, "noise_multiplier": -1.0, "max_grad_norm": 1.0,
                          "planned_rounds": 2, "accountant": "rdp"}}
    model = Tiny(False)
    task = Task("train", 1, config, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad})
    recipe.prepare(model, task)
    first = recipe.train(model, data(n=16), task)
    assert "refused" not in first.metrics and 0 < first.metrics["dp_epsilon"] <= 0.5 * (1 + 1e-6)
    rounds = [recipe.train(model, data(n=16), Task("train", r, config, task.tensors)) for r in (2, 3)]
    refused = [r for r in rounds if "refused" in r.metrics]
    assert refused and "--max-epsilon" in refused[0].metrics["refused"]
    assert spent + state.ledger_file("run-b").load().spent <= state.max_epsilon * (1 + 1e-6)
    with pytest.raises(ConfigError, match="only under client DP"):
        _private_recipe(inner, load_config_text('[strategy]\nname = "fedavg"\n'), "run-c", state)


def test_a_run_the_daemon_cannot_serve_is_refused_and_the_daemon_stays_up():
    from fedadapt.client.agent import ClientAgent
    from fedadapt.proto.auth import Credentials

    built = []

    def make_workload(spec):
        built.append(spec)
        raise ConfigError("this client trains only under client DP")

    agent = ClientAgent("127.0.0.1:1", Credentials("a", "t"), make_workload, log=lambda msg: None)
    header = pb.TaskHeader(run_id="r", round=1, kind="train", config_json="{}", run_spec_json="{}")
    up = agent._handle(header, codec.encode({}))
    assert up.metrics["refused"] == "this client trains only under client DP" and codec.decode(up.payload) == {}
    assert agent._handle(pb.TaskHeader(run_id="r", round=2, kind="train", config_json="{}", run_spec_json="{}"),
                         codec.encode({})).metrics["refused"] and len(built) == 1  # remembered per run


def test_a_resent_task_is_answered_from_the_kept_result_only_when_it_is_the_same_task():
    """After a coordinator restart a round may be set up again with other participants (other secure-aggregation
    peers): the daemon must then train and mask anew, not resend an upload masked for the old setup."""
    from fedadapt.client.agent import ClientAgent
    from fedadapt.client.workload import Workload
    from fedadapt.proto.auth import Credentials
    from fedadapt.runtime.executor import Executor
    from fedadapt.strategies.base import ClientResult

    trained = []

    class Recipe:
        def prepare(self, model, task):
            pass

        def train(self, model, data, task):
            trained.append(task.config)
            return ClientResult("", 1, {"w": torch.zeros(1)}, {})

    agent = ClientAgent("127.0.0.1:1", Credentials("a", "t"), lambda spec: Workload(Executor(None, Recipe()), [0]),
                        log=lambda msg: None)

    def header(config):
        return pb.TaskHeader(run_id="r", round=2, kind="train", config_json=json.dumps(config), run_spec_json="{}")

    empty = codec.encode({"w": torch.zeros(1)})
    agent._last = first = agent._handle(header({"peers": ["a", "b"]}), empty)
    assert agent._handle(header({"peers": ["a", "b"]}), empty) is first and len(trained) == 1
    assert agent._handle(header({"peers": ["a", "c"]}), empty) is not first and len(trained) == 2


def test_fedau_under_secure_aggregation_through_daemons_equals_the_masked_simulation_bit_for_bit(tmp_path):
    """The masks cancel exactly mod 2^64, so whatever keys the daemons hold, the coordinator unmasks the same
    sum as the simulation and ends with its model bit for bit, FedAU's weights (computed by the server from
    earlier rounds, sent with the task, applied by each daemon) included. (The other summing strategies'
    masked forms are checked against their plain runs in tests/test_privacy.py.)"""
    from deploy import coordinator_equals_simulation

    data = tiny_text_file(tmp_path / "lines.jsonl", n_groups=3)
    toml = lora_run_toml(data, rounds=4, clients_per_round=2, min_clients=3,
                         extra='[strategy]\nname = "fedau"\n[privacy]\nsecure_aggregation = true\n')
    with coordinator_equals_simulation(tmp_path, toml, timeout=300) as (_, _, recs):
        for rec in recs:
            assert len(rec["clients"]) == 2 and not rec["rejected"] and "secagg_discarded" not in rec["strategy"]
        assert max(rec["strategy"]["weight_max"] for rec in recs) > 1.0  # some daemon applied a weight above 1
