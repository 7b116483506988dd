"""Shared-seed zeroth-order (FedKSeed / -Pro): the invariants of ALGORITHMS.md §6.5 in fp64 with tiny
tensors, upload validation through the round engine, and late joiners rebuilding theta bit for bit."""

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

from fedadapt.core import codec
from fedadapt.core.config import load_config
from fedadapt.core.errors import ConfigError, PayloadError
from fedadapt.core.rng import normal
from fedadapt.runtime import setup
from fedadapt.runtime.engine import ResultMessage, RoundEngine
from fedadapt.strategies.base import ClientInfo, ClientResult, ModelSpec, RunSettings, Task
from fedadapt.strategies.lowrank import content_hash, hash_metric
from fedadapt.strategies.registry import build
from fedadapt.strategies.seeded import pool_seeds
from fedadapt.strategies.zo import (
    ACC,
    GRADS,
    PROBS,
    SEEDS,
    accumulate,
    apply_steps,
    pro_probabilities,
    pro_update,
    rebuild,
    spsa_step,
)

REPO = Path(__file__).resolve().parent.parent


def theta64(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"b": torch.randn(3, generator=g, dtype=torch.float64),
            "w": torch.randn(4, 5, generator=g, dtype=torch.float64)}


def strategy(**opts):
    settings = RunSettings(0, 10, 3, {"lr": 0.1})
    s, recipe = build({"name": "zo", "seeds": 8, "steps": 4, **opts}, settings)
    return s, recipe


# ----------------------------------------------------------------------------------- pure maths
def test_perturbations_regenerate_bit_identical_in_another_process():
    code = ("import hashlib; from fedadapt.strategies.seeded import pool_seeds; from fedadapt.core.rng import normal;"
            "print(hashlib.sha256(b''.join(normal(s, (1000,)).numpy().tobytes() "
            "for s in pool_seeds(42, 16))).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    here = hashlib.sha256(b"".join(normal(s, (1000,)).numpy().tobytes() for s in pool_seeds(42, 16))).hexdigest()
    assert out.stdout.strip() == here
    assert not torch.equal(normal(pool_seeds(42, 2)[0], (10,)), normal(pool_seeds(42, 2)[1], (10,)))


def test_replay_of_sequential_steps_equals_one_update_per_seed_in_fp64():
    theta0, names, seeds = theta64(), ["b", "w"], pool_seeds(7, 5)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(5, (30,), generator=g).tolist()  # repeats: several steps share a seed
    scalars = (torch.randn(30, generator=g, dtype=torch.float64) * 0.1).tolist()
    sequential = apply_steps(theta0, names, idx, scalars, seeds)
    acc = torch.zeros(5, dtype=torch.float64).index_add_(0, torch.tensor(idx),
                                                         torch.tensor(scalars, dtype=torch.float64))
    collapsed = rebuild(theta0, names, acc, seeds)
    assert max(float((sequential[n] - collapsed[n]).abs().max()) for n in names) <= 1e-12
    assert not torch.equal(collapsed["w"], theta0["w"])


def test_zero_scalars_leave_theta_unchanged_bit_for_bit():
    theta0 = {"w": torch.randn(4, 5)}  # fp32: the fp64 detour must round back exactly
    assert torch.equal(rebuild(theta0, ["w"], torch.zeros(6, dtype=torch.float64), pool_seeds(1, 6))["w"], theta0["w"])


def test_server_folds_lr_and_client_weights_into_the_accumulated_scalars():
    up = [(torch.tensor([0, 2, 0], dtype=torch.int32), torch.tensor([1.0, 2.0, 3.0])),
          (torch.tensor([1], dtype=torch.int32), torch.tensor([-4.0]))]
    acc = accumulate(torch.tensor([0.5, 0.0, 0.0, 0.0], dtype=torch.float64), up, [0.25, 0.75], 0.1)
    assert torch.allclose(acc, torch.tensor([0.5 + 0.025 * 4, 0.075 * -4, 0.025 * 2, 0.0], dtype=torch.float64),
                          rtol=0, atol=1e-15)


def test_pro_probabilities_sum_to_one_are_positive_and_start_uniform():
    k = 6
    p0 = pro_probabilities(torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64))
    assert torch.equal(p0, torch.full((k,), 1 / k, dtype=torch.float64))
    history = [(torch.tensor([0, 1, 1, 5]), torch.tensor([1.0, -3.0, 5.0, 1e9]))]
    s, c = pro_update(torch.zeros(k), torch.zeros(k), history)
    assert float(s[5]) == 1000.0 and float(c[1]) == 2.0  # |g| clipped at 1000 in the history
    p = pro_probabilities(s, c)
    assert abs(float(p.sum()) - 1) < 1e-12 and bool((p > 0).all())
    assert int(p.argmax()) == 5 and float(p[1]) > float(p[0]) > float(p[2])  # bigger mean |g|, sampled more
    equal = pro_probabilities(torch.full((k,), 3.0), torch.full((k,), 2.0))
    assert torch.allclose(equal, torch.full((k,), 1 / k, dtype=torch.float64), rtol=0, atol=1e-15)


def test_perturb_and_restore():
    torch.manual_seed(0)
    params = [torch.randn(50, 20), torch.randn(7)]
    z = [torch.randn_like(p) for p in params]
    before = [p.clone() for p in params]
    spsa_step(params, z, 1e-3, lambda: 0.0, "copy")
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # exact: restored from a copy
    spsa_step(params, z, 1e-3, lambda: 0.0, "inplace")  # +eps, -2eps, +eps in fp32: within a few ulps
    assert all(torch.allclose(p, b, rtol=0, atol=4 * float(torch.finfo(torch.float32).eps) * float(b.abs().max()))
               for p, b in zip(params, before))


def test_options_are_checked():
    with pytest.raises(ConfigError, match="strategy.restore"):
        strategy(restore="later")
    with pytest.raises(ConfigError, match="strategy.seeds"):
        strategy(seeds=0)


# ----------------------------------------------------------------------------------- server + engine
def spec():
    return ModelSpec(theta64(3))


def upload(seeds, grads):
    return {SEEDS: torch.tensor(seeds, dtype=torch.int32), GRADS: torch.tensor(grads, dtype=torch.float32)}


def test_a_zero_round_leaves_the_model_unchanged_and_a_round_moves_it_by_the_scalars():
    s, _ = strategy()
    state = s.init_state(spec())
    same = s.aggregate(1, [ClientResult("a", 3, upload([0, 1, 2, 3], [0.0] * 4))], state).state
    assert all(torch.equal(same.tensors[k], state.tensors[k]) for k in state.tensors)
    moved = s.aggregate(1, [ClientResult("a", 3, upload([1, 1, 4, 0], [1.0, 2.0, -1.0, 0.0]))], state).state
    expect = apply_steps(state.tensors, ["b", "w"], [1, 4], [0.1 * 3.0, 0.1 * -1.0], s.seeds)
    assert all(float((moved.tensors[n] - expect[n]).abs().max()) <= 1e-12 for n in expect)
    assert float(moved.aux[ACC][1]) == pytest.approx(0.3, abs=1e-15)


def test_malformed_uploads_are_rejected_before_aggregation():
    s, _ = strategy()

    bad = {
        "a": upload([0, 1, 2, 3], [0.5, 0.5, 0.5, 0.5]),  # the only good one
        "b": upload([0, 1, 2, 8], [0.5, 0.5, 0.5, 0.5]),  # seed index outside the pool of 8
        "c": upload([0, 1, 2], [0.5, 0.5, 0.5]),  # 3 steps, 4 asked
        "d": {SEEDS: torch.tensor([0, 1, 2, 3], dtype=torch.int64), GRADS: torch.zeros(4)},  # wrong dtype
    }

    class Transport:
        def clients(self):
            return [ClientInfo(c, 5) for c in ("a", "b", "c", "d", "e")]

        def run(self, tasks, *, timeout):
            out = [ResultMessage(t.client_id, t.round, 5, {}, codec.encode(bad[t.client_id]))
                   for t in tasks if t.client_id in bad]
            # e's gradient is NaN: a simulated client sends it anyway (plain safetensors)
            from safetensors.torch import save
            out.append(ResultMessage("e", 1, 5, {}, save(upload([0, 0, 0, 0], [float("nan")] * 4))))
            return out

    s.settings.clients_per_round = 5
    engine = RoundEngine(s, Transport(), spec())
    rec = engine.run_round(1)
    assert rec.clients == ["a"]
    assert set(rec.rejected) == {"b", "c", "d", "e"}
    assert "seed indices outside [0, 8)" in rec.rejected["b"] and "shape (3,)" in rec.rejected["c"]
    assert "dtype" in rec.rejected["d"] and "NaN" in rec.rejected["e"]
    want = accumulate(torch.zeros(8, dtype=torch.float64), [(bad["a"][SEEDS], bad["a"][GRADS])], [1.0], 0.1)
    assert torch.equal(engine.state.aux[ACC], want)


def test_pro_sends_probabilities_and_plain_does_not():
    s, _ = strategy(pro=True)
    state = s.init_state(spec())
    tasks = s.configure(1, [ClientInfo("a"), ClientInfo("b")], state)
    assert torch.equal(tasks["a"].tensors[PROBS], torch.full((8,), 1 / 8))
    assert tasks["a"].tensors is tasks["b"].tensors  # one broadcast, encoded once
    plain, _ = strategy()
    assert set(plain.configure(1, [ClientInfo("a")], plain.init_state(spec()))["a"].tensors) == {ACC}


def test_state_survives_a_commit_and_a_fresh_strategy_resumes_identically(tmp_path):
    from fedadapt.server.store import Store
    from fedadapt.strategies.base import GlobalState

    s, _ = strategy(pro=True)
    state = s.init_state(spec())
    for rnd in (1, 2):
        state = s.aggregate(rnd, [ClientResult("a", 1, upload([rnd, 3, 3, 7], [0.5, -1.0, 2.0, 0.25]))], state).state
    with Store(f"sqlite:///{tmp_path / 'db'}", tmp_path / "blobs") as store:
        run = store.create_run("r", "", 5)
        store.commit_round(run, 1, state.tensors, state.aux, s.state_dict(), {}, [])
        commit = store.last_commit(run)
    again, _ = strategy(pro=True)
    again.init_state(spec())
    again.load_state_dict(commit.strategy_state)
    resumed = GlobalState(commit.tensors, commit.aux, 2)
    a = s.configure(3, [ClientInfo("a")], state)["a"]
    b = again.configure(3, [ClientInfo("a")], resumed)["a"]
    assert codec.encode(a.tensors) == codec.encode(b.tensors) and a.config == b.config
    up = [ClientResult("a", 1, upload([0, 1, 2, 3], [1.0, 1.0, 1.0, 1.0]))]
    x, y = s.aggregate(3, up, state).state, again.aggregate(3, up, resumed).state
    assert all(torch.equal(x.tensors[k], y.tensors[k]) for k in x.tensors)


# ----------------------------------------------------------------------------------- with a real model
def tiny_cfg(rounds=4, per_round=1, extra=()):
    return load_config(None, ['model.source="mlp"', "model.hidden=[8]", 'adapter.kind="full"',
                              'data.dataset="synthetic"', 'data.partition="iid"', "data.num_clients=3",
                              "data.num_examples=90", f"rounds={rounds}", f"clients_per_round={per_round}",
                              "train.batch_size=8", "train.lr=0.01", "seed=5", *extra])


@pytest.mark.parametrize("pro", [False, True])
def test_late_joiners_rebuild_theta_hash_equal_to_the_servers(pro):
    cfg = tiny_cfg(rounds=5, extra=[f'strategy={{name="zo", seeds=32, steps=6, eps=0.01, pro={str(pro).lower()}}}'])
    sc = setup.load(cfg)
    initial = copy.deepcopy(sc.loaded.model)
    strat, recipe = build(cfg.strategy, RunSettings(cfg.seed, cfg.rounds, cfg.clients_per_round,
                                                    dataclasses.asdict(cfg.train)))
    spec_ = ModelSpec({n: p.detach().clone() for n, p in sc.loaded.model.named_parameters() if p.requires_grad})
    engine = RoundEngine(strat, OwnModels(sc.loaded.model, recipe, sc.clients), spec_)
    for rnd in range(1, cfg.rounds + 1):
        server_hash = hash_metric(content_hash({n: engine.state.tensors[n] for n in strat.names}))
        rec = engine.run_round(rnd)
        assert not rec.rejected and rec.strategy["model_hash"] == server_hash  # the client stepped from theta^t
    # a client that never took part rebuilds the final model from theta_0 and the K scalars alone
    late = copy.deepcopy(initial)
    task = strat.configure(cfg.rounds + 1, [ClientInfo("new")], engine.state)["new"]
    task = Task("train", task.round, task.config, codec.decode(codec.encode(task.tensors)))
    recipe.__class__().prepare(late, task)
    got = {n: p.detach() for n, p in late.named_parameters()}
    assert content_hash({n: got[n] for n in strat.names}) == task.config["zo_hash"]
    assert all(torch.equal(got[n], engine.state.tensors[n]) for n in strat.names)
    assert float(torch.count_nonzero(engine.state.aux[ACC])) > 0
    # and one whose theta_0 differs is told so in one line
    other = copy.deepcopy(initial)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(PayloadError, match="out of step"):
        recipe.__class__().prepare(other, task)


@pytest.mark.parametrize("pro", [False, True])
def test_bytes_per_round_stay_under_18_kb_with_1024_seeds(pro):
    s, _ = build({"name": "zo", "seeds": 1024, "steps": 200, "pro": pro}, RunSettings(0, 10, 1, {"lr": 0.1}))
    state = s.init_state(spec())
    down = len(codec.encode(s.configure(1, [ClientInfo("a")], state)["a"].tensors))
    up = len(codec.encode(upload([0] * 200, [0.0] * 200)))
    assert down + up < 18_000, (down, up)


def test_scenario_file_is_valid():
    cfg = load_config(REPO / "simulations/zo.toml")
    settings = RunSettings(cfg.seed, cfg.rounds, cfg.clients_per_round, dataclasses.asdict(cfg.train))
    server, _ = build(cfg.strategy, settings)
    assert server.name == "zo"


# ----------------------------------------------------------------------------------- real coordinator
@pytest.mark.parametrize("strategy_toml", ['name = "zo"\nseeds = 64\nsteps = 8\neps = 0.01\npro = true',
                                           'name = "ferret"\nseeds = 16'])
def test_through_the_coordinator_clients_rebuild_the_servers_model(tmp_path, strategy_toml):
    """3 client daemons (separate processes), 2 per round: each rebuilds theta^t from what the coordinator
    sends (ZO: theta_0 and the K scalars; Ferret: the missed tables or the dense model) and checks its hash;
    the final model equals the in-process simulation's bit for bit."""
    from deploy import coordinator_equals_simulation, lora_run_toml, tiny_text_file

    data = tiny_text_file(tmp_path / "lines.jsonl", n_groups=3)
    toml = lora_run_toml(data, rounds=4, clients_per_round=2, min_clients=3, extra=f"[strategy]\n{strategy_toml}")
    with coordinator_equals_simulation(tmp_path, toml, timeout=300) as (_, _, records):
        assert [len(r["clients"]) for r in records] == [2, 2, 2, 2] and not any(r["rejected"] for r in records)
        assert all(r["strategy"]["model_hashes_distinct"] == 1.0 for r in records)
        assert len({r["strategy"]["model_hash"] for r in records}) == 4  # the model moves every round


def test_filling_a_buffer_draws_the_canonical_stream():
    from fedadapt.strategies.seeded import fill_normal

    buf = torch.full((1000,), 7.0)
    assert torch.equal(fill_normal(123, buf), normal(123, (1000,))) and torch.equal(buf, normal(123, (1000,)))
