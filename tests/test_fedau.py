"""FedAU invariants of ALGORITHMS.md §2.4 on tiny fp64 tensors, its baselines, and its state surviving a
restart from the coordinator's database."""

import json
import random
import signal

import pytest
import torch

from fedadapt.core import codec
from fedadapt.core.config import AvailabilityConfig
from fedadapt.core.errors import ConfigError
from fedadapt.runtime.engine import ResultMessage, RoundEngine
from fedadapt.server.store import Store
from fedadapt.simulation.availability import Availability, AvailabilityTransport
from fedadapt.strategies.base import ClientInfo, ClientResult, GlobalState, ModelSpec, RunSettings
from fedadapt.strategies.fedau import NUM_CLIENTS, Entry, entries, participate, participation_weights
from fedadapt.strategies.registry import build

D = torch.float64


def strategy(n=0, clients_per_round=100, **opts):
    """FedAU with options `opts`; `n` is the run's number of clients (RunSettings.num_clients)."""
    server, _ = build({"name": "fedau", **opts},
                      RunSettings(seed=0, rounds=20, clients_per_round=clients_per_round, train={"lr": 0.1},
                                  num_clients=n))
    return server


def fedavg(**opts):
    return build({"name": "fedavg", **opts}, RunSettings(seed=0, rounds=20, clients_per_round=100,
                                                          train={"lr": 0.1}))[0]


def result(cid, w):
    return ClientResult(cid, 10, {"w": torch.as_tensor(w, dtype=D)})


class Reference:
    """ALGORITHMS.md §2.2 literally: every client updated in every round (0-based t), intervals kept."""

    def __init__(self, cutoff):
        self.cutoff = cutoff or float("inf")
        self.c, self.intervals = 0, []

    def round(self, participates):
        weight = None
        if participates:
            weight = sum(self.intervals) / len(self.intervals) if self.intervals else 1
            self.intervals.append(self.c + 1)
            self.c = 0
        else:
            self.c += 1
            if self.c >= self.cutoff:
                self.intervals.append(self.c)
                self.c = 0
        return weight


# ------------------------------------------------------------------ the estimator


@pytest.mark.parametrize("cutoff, weights, intervals", [
    (0, [1, 1.0, 2.0, 2.0], [1, 3, 2, 5]),  # K = infinity
    (2, [1, 1.5, 4 / 3, 10 / 6], [1, 2, 1, 2, 2, 2, 1]),
])
def test_hand_traces(cutoff, weights, intervals):
    """One client taking part at t = 0, 3, 5, 10 (engine rounds t + 1)."""
    e, ref, got = Entry(), Reference(cutoff), []
    for t in range(11):
        w_ref = ref.round(t in (0, 3, 5, 10))
        if t in (0, 3, 5, 10):
            w, e = participate(e, t + 1, cutoff)
            got.append(w)
            assert w == w_ref
    assert got == weights  # exact: 4/3 and 10/6 are the same doubles either way
    assert ref.intervals == intervals
    assert (e.m, e.total, e.c) == (len(intervals), sum(intervals), ref.c)


@pytest.mark.parametrize("cutoff", [0, 1, 2, 3, 7])
def test_lazy_estimator_equals_the_per_round_spec_and_keeps_the_accounting_identity(cutoff):
    rng = random.Random(cutoff)
    p = {f"c{i}": q for i, q in enumerate([0.05, 0.2, 0.5, 0.9, 1.0])}
    refs = {cid: Reference(cutoff) for cid in p}
    aux = {}
    for rnd in range(1, 301):
        present = [cid for cid in p if rng.random() < p[cid]]
        weights, aux = participation_weights(aux, rnd, present, cutoff)
        expected = [refs[cid].round(cid in present) for cid in p]
        assert weights == [w for cid, w in zip(p, expected) if cid in present]
        for cid, e in entries(aux, rnd, cutoff).items():
            ref = refs[cid]
            assert (e.c, e.m, e.total) == (ref.c, len(ref.intervals), sum(ref.intervals))
            assert e.total + e.c == rnd  # intervals + open count = t + 1 rounds elapsed (t = rnd - 1)
            if cutoff:
                assert e.c < cutoff


@pytest.mark.parametrize("period, cutoff", [(1, 0), (3, 0), (4, 4), (5, 9)])
def test_periodic_client_gets_weight_p_from_its_second_participation(period, cutoff):
    e, weights = Entry(), []
    for t in range(period - 1, 60, period):
        w, e = participate(e, t + 1, cutoff)
        weights.append(w)
    assert weights[0] == 1 and weights[1:] == [period] * (len(weights) - 1)


def test_bernoulli_weights_approach_one_over_p():
    rng, aux, p = random.Random(1), {}, 0.25
    for rnd in range(1, 4001):
        if rng.random() < p:
            (w,), aux = participation_weights(aux, rnd, ["a"], 0)
    assert w == pytest.approx(1 / p, rel=0.1)


# ------------------------------------------------------------------ the update


def test_all_weights_one_and_everyone_participating_is_fedavg_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    au = strategy(n=3)
    a = au.init_state(ModelSpec({"w": torch.randn(4, 3, generator=g, dtype=D)}))
    b = GlobalState(dict(a.tensors))
    for rnd in range(1, 6):  # every interval is 1, so every weight stays 1
        results = [ClientResult(c, n, {"w": torch.randn(4, 3, generator=g, dtype=D)})
                   for c, n in (("x", 3), ("y", 50), ("z", 7))]
        out = au.aggregate(rnd, results, a)
        a, b = out.state, fedavg(weighting="uniform").aggregate(rnd, results, b).state
        assert torch.equal(a.tensors["w"], b.tensors["w"])
        assert out.metrics["weight_max"] == 1.0 and out.metrics["update_scale"] == 1.0


def test_non_participants_contribute_zero_and_the_divisor_stays_n():
    s = strategy(n=4)
    state = s.init_state(ModelSpec({"w": torch.tensor([0.0, 8.0], dtype=D)}))
    out = s.aggregate(1, [result("a", [4.0, 8.0]), result("b", [8.0, 0.0])], state)
    # theta + (1/4)(delta_a + delta_b) = [0, 8] + ([4, 0] + [8, -8]) / 4
    assert out.state.tensors["w"].tolist() == [3.0, 6.0]


def test_single_client_update_is_its_weight_times_its_delta():
    """The hand trace through the strategy: with N = 1 the update is exactly w * delta."""
    s = strategy(n=1, cutoff=2)
    state = s.init_state(ModelSpec({"w": torch.tensor([0.0], dtype=D)}))
    for rnd, w in zip((1, 4, 6, 11), (1, 1.5, 4 / 3, 10 / 6)):
        before = state.tensors["w"].item()
        out = s.aggregate(rnd, [result("a", [before + 3.0])], state)
        state = out.state
        assert out.metrics["weight_max"] == w
        assert state.tensors["w"].item() == pytest.approx(before + 3.0 * w, abs=1e-12)


@pytest.mark.parametrize("weighting, expected", [
    ("participating", [6.0]),  # mean of the participants
    ("all", [3.0]),  # (2 + 10) / 4
    ("known", [5.5]),  # (2 / 1 + 10 / 0.5) / 4
    ("fedau", [3.0]),  # first participation: weight 1, divide by N
])
def test_baselines(weighting, expected):
    s = strategy(n=4, weighting=weighting)
    s.known_probabilities = {"a": 1.0, "b": 0.5}
    state = s.init_state(ModelSpec({"w": torch.tensor([0.0], dtype=D)}))
    out = s.aggregate(1, [result("a", [2.0]), result("b", [10.0])], state)
    assert out.state.tensors["w"].tolist() == expected


def test_server_lr_zero_leaves_the_model_unchanged():
    s = strategy(n=2, server_lr=0.0)
    state = s.init_state(ModelSpec({"w": torch.tensor([1.5, -2.0], dtype=D)}))
    out = s.aggregate(1, [result("a", [9.0, 9.0])], state)
    assert torch.equal(out.state.tensors["w"], state.tensors["w"])


def test_n_is_never_below_the_clients_seen():
    s = strategy(n=1)
    state = s.init_state(ModelSpec({"w": torch.tensor([0.0], dtype=D)}))
    out = s.aggregate(1, [result("a", [2.0]), result("b", [4.0])], state)
    assert out.metrics["num_clients"] == 2 and out.state.tensors["w"].tolist() == [3.0]


@pytest.mark.parametrize("opts, needle", [
    ({"weighting": "magic"}, "'strategy.weighting' must be one of"),
    ({"cutof": 3}, "unknown config key 'strategy.cutof' (did you mean 'strategy.cutoff'?)"),
    ({"cutoff": -1}, "must be >= 0"),
    ({"server_lr": -1.0}, "'strategy.server_lr' must be >= 0"),
])
def test_bad_options_are_one_line_errors(opts, needle):
    with pytest.raises(ConfigError) as err:
        strategy(n=3, **opts)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unknown_n_and_known_without_an_oracle_are_refused_at_start():
    spec = ModelSpec({"w": torch.zeros(1, dtype=D)})
    with pytest.raises(ConfigError, match="total number of clients N"):
        strategy(n=0).init_state(spec)
    with pytest.raises(ConfigError, match="only a simulation has"):
        strategy(n=3, weighting="known").init_state(spec)
    assert int(strategy(n=3, num_clients=7).init_state(spec).aux[NUM_CLIENTS]) == 7  # the option wins


# ------------------------------------------------------------------ restart from the database


class EchoClients:
    """Fake transport: client k returns theta + a seeded perturbation of (round, k)."""

    def __init__(self, n):
        self.ids = [f"c{i}" for i in range(n)]

    def clients(self):
        return [ClientInfo(cid, 10) for cid in self.ids]

    def run(self, tasks, *, timeout):
        out = []
        for t in tasks:
            theta = codec.decode(t.payload)
            g = torch.Generator().manual_seed(t.round * 1000 + int(t.client_id[1:]))
            new = {k: v + torch.randn(v.shape, generator=g, dtype=D) for k, v in theta.items()}
            out.append(ResultMessage(t.client_id, t.round, 10, {}, codec.encode(new)))
        return out


def engine_for(cutoff, n=8):
    s = strategy(n=n, clients_per_round=6, cutoff=cutoff)
    avail = Availability(AvailabilityConfig(pattern="markov", markov_rate=0.3), 5,
                         {f"c{i}": 0.2 + 0.1 * i for i in range(n)})
    return s, RoundEngine(s, AvailabilityTransport(EchoClients(n), avail),
                          ModelSpec({"w": torch.zeros(3, 2, dtype=D)}))


@pytest.mark.parametrize("cutoff", [0, 3])
def test_restart_from_the_store_continues_bit_for_bit(tmp_path, cutoff):
    rounds, stop = 12, 5
    _, whole = engine_for(cutoff)
    whole.run(rounds)

    with Store(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "blobs") as store:
        run_id = store.create_run("fedau", "", rounds)
        s, first = engine_for(cutoff)
        for rnd in range(1, stop + 1):
            first.run_round(rnd)
            store.commit_round(run_id, rnd, first.state.tensors, first.state.aux, s.state_dict(), {}, [])
        commit = store.last_commit(run_id)
    # a new coordinator process: fresh strategy and engine, state from the database (as server/runs.py)
    s2, resumed = engine_for(cutoff, n=8)
    resumed.state = GlobalState(commit.tensors, commit.aux, commit.round)
    s2.load_state_dict(commit.strategy_state)
    weights = []
    resumed.run(rounds, lambda rec: weights.append(rec.strategy))
    assert torch.equal(resumed.state.tensors["w"], whole.state.tensors["w"])
    assert resumed.state.aux.keys() == whole.state.aux.keys()
    assert all(torch.equal(resumed.state.aux[k], whole.state.aux[k]) for k in whole.state.aux)
    # the estimator actually worked: some weights differ from 1
    assert any(w.get("weight_max", 1.0) > 1.0 for w in weights)


# ------------------------------------------------------------------ kill -9 of a real coordinator

KILL_TOML = """
name = "fedau-kill9"
seed = 3
rounds = 8
clients_per_round = 2   # 2 of the 3 registered clients per round: participation varies, weights differ from 1
[model]
source = "mlp"
hidden = [16]
[adapter]
kind = "full"
[data]
dataset = "synthetic"
partition = "iid"
num_clients = 3
num_examples = 120
[train]
lr = 0.05
local_steps = 200       # a fraction of a second per round: the kill lands while the run is under way
batch_size = 16
[eval]
every = 4
max_examples = 16
[coordinator]
min_clients = 3
[strategy]
name = "fedau"
cutoff = 2
"""


def test_kill9_coordinator_resumes_fedau_weights_bit_identical(tmp_path):
    from deploy import Deployment
    from safetensors.torch import load_file

    from fedadapt.cli import main
    from fedadapt.server.certs import token_credentials

    (tmp_path / "run.toml").write_text(KILL_TOML)
    assert main(["simulate", str(tmp_path / "run.toml"), "--out", str(tmp_path / "ref"), "--threads", "1"]) == 0
    reference = load_file(tmp_path / "ref" / "model.safetensors")
    ref_rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["strategy"]["weight_max"] > 1 for r in ref_rows)  # the estimator is at work

    d = Deployment(tmp_path / "deploy", f"sqlite:///{tmp_path / 'fedadapt.db'}", tls=False)
    try:
        names = [f"client-{i:03d}" for i in range(3)]
        with Store(d.db_url, d.data_dir) as store:  # as `fedadapt clients add NAME --out DIR`, in-process
            for name in names:
                store.add_client(name, (token_credentials(d.root / "creds" / name, name) / "token").read_text().strip())
        coord = d.start_coordinator()
        for name in names:
            d.start_client(name)
        run_id = d.submit(KILL_TOML)
        coord.wait_for("round 3 committed", timeout=180)
        coord.kill(signal.SIGKILL)
        assert "round 8 committed" not in coord.text()
        coord2 = d.start_coordinator()
        info = d.wait_status(run_id, ("finished", "failed", "stopped"))
        assert info["status"] == "finished", d.logs()
        assert "resumes after committed round" in coord2.text()
        got = load_file(info["model_path"])
        assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
        with Store(d.db_url, d.data_dir) as store:  # the per-round weights, too, as committed
            committed = [rec["strategy"] for _, rec in store.records(run_id)]
            assert committed == [r["strategy"] for r in ref_rows]
            aux = store.last_commit(run_id).aux
        assert int(aux[NUM_CLIENTS]) == 3 and len(entries(aux, 8, 2)) == 3
    finally:
        d.close()
