"""Ferret: the invariants of ALGORITHMS.md §6.5 in fp64 with tiny tensors, upload validation through the
round engine, and clients that replay missed tables (or take the dense model) hash-equal to the server."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from own_models import OwnModels  # tests/own_models.py
from safetensors.torch import save

from fedadapt.core import codec
from fedadapt.core.config import load_config
from fedadapt.core.errors import ConfigError, PayloadError
from fedadapt.runtime import setup
from fedadapt.runtime.engine import ResultMessage, RoundEngine
from fedadapt.strategies.base import ClientInfo, ClientResult, ModelSpec, RunSettings, Task
from fedadapt.strategies.ferret import (
    ENTRIES,
    PRUNED,
    apply_table,
    base,
    coordinates,
    pack,
    partition,
    reconstruct,
    seed_counts,
    unpack,
)
from fedadapt.strategies.lowrank import content_hash, hash_metric
from fedadapt.strategies.registry import build
from fedadapt.strategies.seeded import pool_seeds

REPO = Path(__file__).resolve().parent.parent


def strategy(**opts):
    return build({"name": "ferret", "seeds": 4, **opts}, RunSettings(0, 10, 3, {"lr": 0.1}))[0]


def spec():
    g = torch.Generator().manual_seed(0)
    # sorted names a, b, c, d; sizes 6, 2, 3, 20: median 4.5, cap 4.05 -> blocks [a], [b], [c], [d]
    return ModelSpec({n: torch.randn(*s, generator=g, dtype=torch.float64)
                      for n, s in {"a": (2, 3), "b": (2,), "c": (3,), "d": (4, 5)}.items()})


# ----------------------------------------------------------------------------------- pure maths
def test_bases_regenerate_bit_identical_in_another_process():
    code = ("import hashlib; from fedadapt.strategies.ferret import base; "
            "from fedadapt.strategies.seeded import pool_seeds;"
            "print(hashlib.sha256(b''.join(base(s, l, 333, k).numpy().tobytes() for s in pool_seeds(9, 8) "
            "for l in range(3) for k in ('gaussian', 'truncnormal'))).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    here = hashlib.sha256(b"".join(base(s, l, 333, k).numpy().tobytes() for s in pool_seeds(9, 8)
                                   for l in range(3) for k in ("gaussian", "truncnormal"))).hexdigest()
    assert out.stdout.strip() == here
    assert not torch.equal(base(1, 0, 5), base(1, 1, 5))  # another block, another vector


def test_partition_follows_the_median_rule():
    assert partition([6, 2, 3, 20]) == [[0], [1], [2], [3]]
    assert partition([1, 1, 1, 10, 10, 1, 1]) == [[0], [1], [2], [3], [4], [5], [6]]  # cap 0.9
    assert partition([4, 4, 4, 9, 1, 1, 1]) == [[0], [1], [2], [3], [4, 5, 6]]  # median 4, cap 3.6
    assert partition([4, 4, 4, 4]) == [[0], [1], [2], [3]]
    assert partition([1, 1, 1, 1, 9, 9]) == [[0], [1], [2], [3], [4], [5]]
    assert partition([1, 1, 1, 5, 5, 5]) == [[0, 1], [2], [3], [4], [5]]  # median 3, cap 2.7


def test_seed_counts_per_block():
    counts = seed_counts([0.5, 2.0, 0.01, 1.0], 100, 2)
    assert counts == [25, 100, 2, 50]  # K for the largest update, at least min_bases for all
    assert seed_counts([0.0, 0.0], 100, 2) == [2, 2]
    assert seed_counts([1.0, float("nan")], 100, 2) == [2, 2]  # diverged: its NaN values are rejected
    assert seed_counts([1.0, 1e-9], 3, 5) == [3, 3]  # never more than K


def test_reconstruction_is_linear_in_the_table():
    seeds, sizes = pool_seeds(3, 5), [4, 7]
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([0, 2, 3, 5, 9])  # block 0: seeds 0, 2, 3; block 1: seeds 0, 4
    tables = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3)]
    w = [0.2, 0.5, 0.3]
    for kind in ("gaussian", "truncnormal"):
        whole = reconstruct(index, sum(wi * t for wi, t in zip(w, tables)), sizes, seeds, kind)
        parts = sum(wi * reconstruct(index, t, sizes, seeds, kind) for wi, t in zip(w, tables))
        assert float((whole - parts).abs().max()) <= 1e-12


def test_zero_update_gives_zero_coordinates_and_a_zero_table_leaves_theta_unchanged():
    seeds = pool_seeds(3, 6)
    assert torch.equal(coordinates(torch.zeros(9), seeds, 0, [1, 4], "gaussian"), torch.zeros(2, dtype=torch.float64))
    flat = [torch.randn(9, dtype=torch.float64)]
    out = apply_table(flat, torch.tensor([1, 4]), torch.zeros(2), seeds, "gaussian", 10.0, 10.0)
    assert torch.equal(out[0], flat[0])
    s = strategy()
    state = s.init_state(spec())
    zero = pack(torch.tensor([0, 1, 4, 5, 8, 9, 12, 13]), torch.zeros(8))
    new = s.aggregate(1, [ClientResult("a", 1, {ENTRIES: zero})], state).state
    assert all(torch.equal(new.tensors[k], state.tensors[k]) for k in state.tensors)


@pytest.mark.parametrize("kind,scale", [("gaussian", 1.0), ("truncnormal", 1 / 3)])
def test_reconstruction_scale(kind, scale):
    """E[delta_hat] = delta for the unbiased basis, about delta / 3 for the reference's truncated normal."""
    d, k, n = 6, 4000, 4000
    delta = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0, -1.0], dtype=torch.float64)
    seeds = pool_seeds(11, k)
    chosen = list(range(n))
    gamma = coordinates(delta, seeds, 0, chosen, kind)
    got = reconstruct(torch.tensor(chosen), gamma, [d], seeds, kind)
    ratio = float(got @ delta / (delta @ delta))
    assert ratio == pytest.approx(scale, rel=0.1)


def test_clip_bounds_each_seed_block_step():
    seeds = pool_seeds(3, 2)
    zero = [torch.zeros(50, dtype=torch.float64)]
    out = apply_table(zero, torch.tensor([0]), torch.tensor([1e6]), seeds, "gaussian", 0.5, 2.0)
    assert float(out[0].norm()) == pytest.approx(0.5 * 2.0, rel=1e-12)  # lr * clip
    free = apply_table(zero, torch.tensor([0]), torch.tensor([1e6]), seeds, "gaussian", 0.5, 0.0)
    assert float(free[0].norm()) > 1e4


def test_entries_round_trip_through_the_packed_tensor():
    index, value = torch.tensor([3, 7, 100]), torch.tensor([0.25, -1.5e-30, 3.0e30])
    i2, v2 = unpack(pack(index, value))
    assert torch.equal(i2, index) and torch.equal(v2, value)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="strategy.basis"):
        strategy(basis="uniform")
    with pytest.raises(ConfigError, match="strategy.min_bases"):
        strategy(min_bases=0)


# ----------------------------------------------------------------------------------- server + engine
def test_malformed_uploads_are_rejected_before_aggregation():
    s = strategy()
    ok = pack(torch.tensor([0, 1, 4, 6, 8, 9, 12, 15]), torch.full((8,), 0.5))
    bad = {
        "a": {ENTRIES: ok},
        "b": {ENTRIES: pack(torch.tensor([0, 1, 4, 6, 8, 9, 12, 16]), torch.full((8,), 0.5))},  # index past K*L
        "c": {ENTRIES: pack(torch.tensor([1, 0, 4, 6, 8, 9, 12, 15]), torch.full((8,), 0.5))},  # not increasing
        "d": {ENTRIES: pack(torch.tensor([0, 4, 6, 8, 9, 12, 13, 15]), torch.full((8,), 0.5))},  # block 0: 1 base
        "e": {ENTRIES: pack(torch.tensor([0, 1, 4, 6, 8, 9, 12, 15]), torch.full((8,), float("nan")))},
        "f": {ENTRIES: pack(torch.arange(6), torch.ones(6))},  # fewer than 2 bases x 4 blocks
    }

    class Transport:
        def clients(self):
            return [ClientInfo(c, 5) for c in bad]

        def run(self, tasks, *, timeout):
            return [ResultMessage(t.client_id, t.round, 5, {}, save(bad[t.client_id])) for t in tasks]

    s.settings.clients_per_round = len(bad)
    engine = RoundEngine(s, Transport(), spec())
    rec = engine.run_round(1)
    assert rec.clients == ["a"]
    assert "indices outside [0, 16)" in rec.rejected["b"]
    assert "not strictly increasing" in rec.rejected["c"]
    assert "fewer than 2 bases" in rec.rejected["d"]
    assert "NaN" in rec.rejected["e"]
    assert "shape (6, 2), expected (8..16, 2)" in rec.rejected["f"]
    ref = strategy()
    alone = ref.aggregate(1, [ClientResult("a", 5, {ENTRIES: ok})], ref.init_state(spec())).state
    assert all(torch.equal(engine.state.tensors[k], alone.tensors[k]) for k in alone.tensors)


def test_late_clients_get_missed_tables_or_the_dense_model_whichever_is_smaller():
    s = strategy(seeds=2)
    state = s.init_state(spec())
    for rnd in (1, 2, 3, 4):  # each round's table: 8 entries x 8 bytes; the dense model: 31 x 8 bytes
        up = pack(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]), torch.full((8,), 0.1 * rnd))
        state = s.aggregate(rnd, [ClientResult("a", 1, {ENTRIES: up})], state).state
        state.round = rnd
    assert set(s._catch_up(state, 3)) == {"ferret/round/4/index", "ferret/round/4/value"}
    assert set(s._catch_up(state, 1)) == {f"ferret/round/{r}/{p}" for r in (2, 3, 4) for p in ("index", "value")}
    # 4 tables (256 bytes) would cost more than the dense model (248): round 1's was pruned, a fresh client gets dense
    assert int(state.aux[PRUNED]) == 1 and "ferret/round/1/index" not in state.aux
    assert set(s._catch_up(state, 0)) == {"a", "b", "c", "d"} and s._catch_up(state, 4) == {}


def test_state_survives_a_commit_and_a_fresh_strategy_resumes_identically(tmp_path):
    from fedadapt.server.store import Store
    from fedadapt.strategies.base import GlobalState

    s = strategy(seeds=2)
    state = s.init_state(spec())
    for rnd in (1, 2):
        up = pack(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]), torch.full((8,), 0.1 * rnd))
        state = s.aggregate(rnd, [ClientResult("a", 1, {ENTRIES: up})], state).state
        state.round = rnd
    with Store(f"sqlite:///{tmp_path / 'db'}", tmp_path / "blobs") as store:
        run = store.create_run("r", "", 5)
        store.commit_round(run, 1, state.tensors, state.aux, s.state_dict(), {}, [])
        commit = store.last_commit(run)
    again = strategy(seeds=2)
    again.init_state(spec())
    again.load_state_dict(commit.strategy_state)
    resumed = GlobalState(commit.tensors, commit.aux, 2)
    clients = [ClientInfo("a"), ClientInfo("b")]
    a, b = s.configure(3, clients, state), again.configure(3, clients, resumed)
    assert a.keys() == b.keys() and all(codec.encode(a[c].tensors) == codec.encode(b[c].tensors) for c in a)
    assert all(a[c].config == b[c].config for c in a)
    assert set(a["a"].tensors) == {"ferret/round/2/index", "ferret/round/2/value"}  # a trained in round 2


# ----------------------------------------------------------------------------------- with a real model
def tiny_cfg(rounds=5, per_round=1, extra=()):
    return load_config(None, ['model.source="mlp"', "model.hidden=[8]", 'adapter.kind="full"',
                              'data.dataset="synthetic"', 'data.partition="iid"', "data.num_clients=3",
                              "data.num_examples=90", f"rounds={rounds}", f"clients_per_round={per_round}",
                              "train.batch_size=8", "train.lr=0.05", "train.local_steps=3", "seed=5", *extra])


@pytest.mark.parametrize("basis", ["gaussian", "truncnormal"])
def test_clients_replay_missed_tables_hash_equal_to_the_server(basis):
    cfg = tiny_cfg(rounds=8, extra=[f'strategy={{name="ferret", seeds=40, basis="{basis}", params=["encoder.*"]}}'])
    sc = setup.load(cfg)
    initial = copy.deepcopy(sc.loaded.model)
    strat, recipe = build(cfg.strategy, RunSettings(cfg.seed, cfg.rounds, cfg.clients_per_round,
                                                    dataclasses.asdict(cfg.train)))
    spec_ = ModelSpec({n: p.detach().clone() for n, p in sc.loaded.model.named_parameters() if p.requires_grad})
    transport = OwnModels(sc.loaded.model, recipe, sc.clients)
    engine = RoundEngine(strat, transport, spec_)
    names = strat.layout.names
    assert names and all(n.startswith("encoder.") for n in names) and len(names) < len(spec_.initial)
    kinds = set()
    for rnd in range(1, cfg.rounds + 1):
        server_hash = hash_metric(content_hash({n: engine.state.tensors[n] for n in names}))
        tasks = strat.configure(rnd, transport.clients(), engine.state)
        kinds |= {"dense" if names[0] in t.tensors else "tables" if t.tensors else "none" for t in tasks.values()}
        rec = engine.run_round(rnd)
        assert not rec.rejected and rec.strategy["model_hash"] == server_hash
    assert kinds == {"none", "dense", "tables"}, kinds  # round 1 needs nothing; both catch-up paths were taken
    # the untuned parameters never moved
    assert all(torch.equal(engine.state.tensors[n], spec_.initial[n]) for n in spec_.initial if n not in names)
    # seed counts per block in every real upload: >= 2, and K for the block with the largest update
    k, blocks = 40, len(strat.layout.blocks)
    for e in (u[ENTRIES] for u in transport.uploads):
        counts = torch.bincount(unpack(e)[0] // k, minlength=blocks)
        assert int(counts.min()) >= 2 and int(counts.max()) == k
    # a brand-new client catches up from theta_0 and ends hash-equal to the server
    late = copy.deepcopy(initial)
    task = strat.configure(cfg.rounds + 1, [ClientInfo("new")], engine.state)["new"]
    recipe.__class__().prepare(late, Task("train", task.round, task.config, codec.decode(codec.encode(task.tensors))))
    got = dict(late.named_parameters())
    assert all(torch.equal(got[n].detach(), engine.state.tensors[n]) for n in names)


def test_a_client_out_of_step_is_refused_with_one_line():
    cfg = tiny_cfg(rounds=2, extra=['strategy={name="ferret", seeds=8}'])
    sc = setup.load(cfg)
    strat, recipe = build(cfg.strategy, RunSettings(cfg.seed, cfg.rounds, 1, dataclasses.asdict(cfg.train)))
    spec_ = ModelSpec({n: p.detach().clone() for n, p in sc.loaded.model.named_parameters() if p.requires_grad})
    state = strat.init_state(spec_)
    task = strat.configure(1, [ClientInfo("x")], state)["x"]
    bad = Task("train", 1, {**task.config, "ferret_hash": "0" * 64}, task.tensors)
    with pytest.raises(PayloadError, match="out of step with the coordinator at round 0"):
        recipe.prepare(copy.deepcopy(sc.loaded.model), bad)
    later = Task("train", 3, {**task.config, "ferret_base_round": 2, "ferret_from": 1}, {})
    with pytest.raises(PayloadError, match="at round 0, but the task's tables start after round 1"):
        recipe.prepare(copy.deepcopy(sc.loaded.model), later)


def test_scenario_file_is_valid():
    cfg = load_config(REPO / "simulations/ferret.toml")
    settings = RunSettings(cfg.seed, cfg.rounds, cfg.clients_per_round, dataclasses.asdict(cfg.train))
    server, _ = build(cfg.strategy, settings)
    assert server.name == "ferret"
