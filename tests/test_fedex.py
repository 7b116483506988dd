"""FedEx-LoRA (ALGORITHMS.md §9.4): the global model W0' + s B'A' is exactly the weighted mean of the clients'
models (fp64, hand example and random non-square modules, mixed ranks), the low-rank residual, catch-up of
clients that missed rounds (bases hash-equal the server's), resume from a commit, privacy, and a real
coordinator run."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from deploy import coordinator_equals_simulation, lora_run_toml, tiny_text_file
from lowrank_fixtures import M1, M2, D, lora_spec, server, t, tiny_cfg
from own_models import OwnModels  # tests/own_models.py
from safetensors.torch import load_file

from fedadapt.core import codec
from fedadapt.core.config import load_config
from fedadapt.core.errors import ConfigError, PayloadError
from fedadapt.models.lora_layers import base_weights, lora_layers
from fedadapt.runtime import setup
from fedadapt.runtime.engine import ResultMessage, RoundEngine
from fedadapt.server.store import Store
from fedadapt.strategies.base import ClientInfo, ClientResult, GlobalState, ModelSpec, Task
from fedadapt.strategies.fedex import BASE, PRUNED, residual, residual_stack
from fedadapt.strategies.lowrank import content_hash, exported_factors, hash_metric
from fedadapt.strategies.registry import build

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def strategy(per_round=3, **opts):
    return server("fedex-lora", per_round, **opts)


def spec(m=3, n=4, r=2, mods=(M1, M2)):
    return lora_spec(m, n, r, mods)


def upload(rank, g, m=3, n=4, mods=(M1, M2)):
    out = {"head.weight": torch.randn(2, m, generator=g, dtype=D), "head.bias": torch.randn(2, generator=g, dtype=D)}
    for mod in mods:
        out[f"{mod}.lora_A"], out[f"{mod}.lora_B"] = torch.randn(rank, n, generator=g, dtype=D), \
            torch.randn(m, rank, generator=g, dtype=D)
    return out


def model_of(tensors, mod, s=1.0):
    """W - W0 of the global model: s (D + B A)."""
    return s * (tensors[mod + BASE] + tensors[mod + ".lora_B"] @ tensors[mod + ".lora_A"])


# ----------------------------------------------------------------------------------- §9.4 invariants
def test_hand_example_folds_the_fedit_error_into_the_base():
    s = strategy(weighting="uniform")
    state = s.init_state(spec(m=2, n=2, r=1, mods=(M1,)))
    ups = [{"head.weight": torch.zeros(2, 2, dtype=D), "head.bias": torch.zeros(2, dtype=D),
            f"{M1}.lora_B": b, f"{M1}.lora_A": a} for b, a in ((t([[1], [0]]), t([[1, 0]])), (t([[0], [1]]), t([[0, 1]])))]
    out = s.aggregate(1, [ClientResult("x", 5, ups[0]), ClientResult("y", 7, ups[1])], state)
    new = out.state.tensors
    assert torch.equal(new[f"{M1}.lora_B"], t([[0.5], [0.5]])) and torch.equal(new[f"{M1}.lora_A"], t([[0.5, 0.5]]))
    assert torch.equal(new[M1 + BASE], t([[0.25, -0.25], [-0.25, 0.25]]))  # Res, rank (k - 1) r = 1
    assert torch.equal(model_of(new, M1), 0.5 * torch.eye(2, dtype=D))  # W0' + B'A' = W0 + I/2 exactly
    assert out.metrics["residual_norm"] == 0.5  # the FedIT error ||Res||_F
    # the residual stack reproduces Res exactly too
    a, b, w = residual_stack([(u[f"{M1}.lora_A"], u[f"{M1}.lora_B"]) for u in ups], [0.5, 0.5],
                             new[f"{M1}.lora_A"], new[f"{M1}.lora_B"])
    assert torch.equal(residual(a, b, w), new[M1 + BASE])


@pytest.mark.parametrize("seed", range(3))
def test_global_model_is_the_weighted_mean_of_the_clients_models_to_1e12(seed):
    """k = 4, r = 2, m = 12 != n = 10, p ~ (10, 30, 20, 40), three rounds so that D^t != 0 (§9.4's random test)."""
    g = torch.Generator().manual_seed(seed)
    s, m, n, r, ns = strategy(per_round=4), 12, 10, 2, [10, 30, 20, 40]
    state = s.init_state(spec(m, n, r))
    p = [k / sum(ns) for k in ns]
    for rnd in (1, 2, 3):
        ups = [upload(r, g, m, n) for _ in ns]
        out = s.aggregate(rnd, [ClientResult(f"c{i}", k, u) for i, (k, u) in enumerate(zip(ns, ups))], state)
        new = out.state.tensors
        for mod in (M1, M2):
            clients = [state.tensors[mod + BASE] + u[f"{mod}.lora_B"] @ u[f"{mod}.lora_A"] for u in ups]
            want = sum(pk * c for pk, c in zip(p, clients))
            assert (model_of(new, mod) - want).abs().max() <= 1e-12
            res = new[mod + BASE] - state.tensors[mod + BASE]  # in the layer's (out, in) layout
            assert res.shape == (m, n) and int(torch.linalg.matrix_rank(res)) == (len(ns) - 1) * r
            assert torch.allclose(new[f"{mod}.lora_A"], sum(pk * u[f"{mod}.lora_A"] for pk, u in zip(p, ups)),
                                  atol=1e-14, rtol=0)  # the warm start is FedAvg's
        assert (new["head.weight"] - sum(pk * u["head.weight"] for pk, u in zip(p, ups))).abs().max() <= 1e-14
        assert 0 < out.metrics["residual_rel"] < 2
        state = out.state
        state.round = rnd


def test_one_client_or_identical_clients_leave_the_base_unchanged():
    g = torch.Generator().manual_seed(0)
    s = strategy()
    state = s.init_state(spec())
    up = upload(2, g)
    for results in ([ClientResult("a", 3, up)], [ClientResult("a", 3, up), ClientResult("b", 5, dict(up))]):
        out = s.aggregate(1, results, state)  # Res = 0 up to the rounding of its fixed-order fp64 sum
        assert all(out.state.tensors[m + BASE].abs().max() <= 1e-14 for m in (M1, M2))
        assert out.metrics["residual_norm"] <= 1e-14


def test_mixed_ranks_stay_exact_and_low_rank_clients_hold_the_global_tail():
    """Ranks (1, 2, 4, 2) under a rank-4 global adapter: each client trains its leading r_k components and
    holds the rest of the global factors; the global model is the weighted mean of those models."""
    g = torch.Generator().manual_seed(3)
    s = strategy(per_round=4, ranks=[1, 2, 4, 2])
    m, n, rmax = 7, 5, 4
    state = s.init_state(spec(m, n, rmax))
    state.tensors[f"{M1}.lora_B"] = torch.randn(m, rmax, generator=g, dtype=D)  # a warm start with a tail
    clients = [ClientInfo(c, 1) for c in "abcd"]
    tasks = s.configure(1, clients, state)
    ranks = [tasks[c].config["fedex_rank"] for c in "abcd"]
    assert ranks == [1, 2, 4, 2]
    assert s.task_contract(state, tasks["a"])[f"{M1}.lora_B"].shape == (m, 1)
    assert tasks["a"].tensors[f"{M1}.lora_A"].shape == (rmax, n)  # the full warm start: a needs its tail
    ups = [upload(r, g, m, n) for r in ranks]
    ns = [4, 1, 2, 3]
    out = s.aggregate(1, [ClientResult(c, k, u) for c, k, u in zip("abcd", ns, ups)], state)
    p = [k / 10 for k in ns]
    for mod in (M1, M2):
        b0, a0 = state.tensors[f"{mod}.lora_B"], state.tensors[f"{mod}.lora_A"]
        models = [u[f"{mod}.lora_B"] @ u[f"{mod}.lora_A"] + b0[:, r:] @ a0[r:] for u, r in zip(ups, ranks)]
        assert (model_of(out.state.tensors, mod) - sum(pk * x for pk, x in zip(p, models))).abs().max() <= 1e-12
    with pytest.raises(ConfigError, match="exceed the global adapter.rank 2"):
        strategy(ranks=[4]).init_state(spec(r=2))


def test_a_and_b_are_told_apart_by_name_when_dimensions_equal_the_rank():
    g = torch.Generator().manual_seed(1)
    s = strategy(weighting="uniform")
    state = s.init_state(spec(m=2, n=2, r=2))
    ups = [upload(2, g, 2, 2) for _ in range(2)]
    out = s.aggregate(1, [ClientResult("a", 1, ups[0]), ClientResult("b", 1, ups[1])], state)
    want = sum(0.5 * u[f"{M1}.lora_B"] @ u[f"{M1}.lora_A"] for u in ups)
    assert (model_of(out.state.tensors, M1) - want).abs().max() <= 1e-12


def test_residual_stacks_or_the_dense_base_whichever_is_smaller_and_to_lora():
    g = torch.Generator().manual_seed(2)
    s = strategy(per_round=1)
    m, n = 40, 30  # D costs 40 x 30; one client's residual stack (2 x 2 rows of 70) is much less
    state = s.init_state(spec(m, n, 2))
    for rnd in (1, 2, 3):
        state = s.aggregate(rnd, [ClientResult("a", 1, upload(2, g, m, n))], state).state
        state.round = rnd
    assert int(state.aux[PRUNED]) == 0 and {k for k in state.aux if k.startswith("resid/")} >= {f"resid/3/{M1}/A"}
    assert set(s._catch_up(state, 2)) == {f"resid/3/{M1}/A", f"resid/3/{M1}/B", f"resid/3/{M2}/A",
                                          f"resid/3/{M2}/B", "resid/3/w"}
    assert set(s._catch_up(state, -1)) == {M1 + BASE, M2 + BASE} and s._catch_up(state, 3) == {}
    exported = exported_factors(state.tensors, None, 0.5, BASE)  # what `fedadapt export` writes
    a, b, _ = exported.factors[M1]
    assert b.shape == (m, 2) and a.shape == (2, n)
    assert torch.equal(exported.base_delta[M1], 0.5 * state.tensors[M1 + BASE])
    assert set(exported.params) == {"head.weight", "head.bias"}


def test_wrong_rank_is_rejected_before_aggregation_and_the_others_still_aggregate():
    s = strategy(ranks=[1, 2, 2])

    class Transport:
        def clients(self):
            return [ClientInfo(c, 5) for c in ("a", "b", "c")]

        def run(self, tasks, *, timeout):
            g = torch.Generator().manual_seed(0)
            return [ResultMessage(tk.client_id, tk.round, 5, {}, codec.encode(
                upload(tk.config["fedex_rank"] + (tk.client_id == "b"), g, 30, 20))) for tk in tasks]

    engine = RoundEngine(s, Transport(), spec(30, 20))  # big enough that a round's residual stack beats D
    rec = engine.run_round(1)
    assert rec.clients == ["a", "c"]
    assert rec.rejected == {"b": f"tensor '{M1}.lora_A' has shape (3, 20), expected (2, 20)"}
    again = s.configure(2, Transport().clients(), engine.state)  # b may hold any base: it gets D
    assert M1 + BASE in again["b"].tensors and M1 + BASE not in again["a"].tensors


def test_unknown_options_and_central_dp_are_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="strategy.rank'"):
        strategy(rank=[4])
    with pytest.raises(ConfigError, match="'strategy.ranks' must be positive"):
        strategy(ranks=[0])
    data = tiny_text_file(tmp_path / "lines.jsonl")
    (tmp_path / "run.toml").write_text(lora_run_toml(data, extra='[strategy]\nname = "fedex-lora"'))
    with pytest.raises(ConfigError, match="central.*product B_i A_i"):
        setup.check(load_config(tmp_path / "run.toml", ["privacy.dp=central", "privacy.epsilon=3"]))
    setup.check(load_config(tmp_path / "run.toml", ["privacy.dp=client", "privacy.epsilon=3",
                                                    "privacy.secure_aggregation=true"]), "coordinator")


def test_state_survives_a_commit_and_a_fresh_strategy_resumes_identically(tmp_path):
    g = torch.Generator().manual_seed(4)
    s = strategy(per_round=1)
    state = s.init_state(spec(40, 30, 2))
    for rnd in (1, 2):
        state = s.aggregate(rnd, [ClientResult("a", 1, upload(2, g, 40, 30))], state).state
        state.round = rnd
    with Store(f"sqlite:///{tmp_path / 'db'}", tmp_path / "blobs") as store:
        run = store.create_run("r", "", 5)
        store.commit_round(run, 1, state.tensors, state.aux, s.state_dict(), {}, [])
        commit = store.last_commit(run)
    again = strategy(per_round=2)
    again.init_state(spec(40, 30, 2))
    again.load_state_dict(commit.strategy_state)
    resumed = GlobalState(commit.tensors, commit.aux, 2)
    a = strategy(per_round=2)
    a.init_state(spec(40, 30, 2))
    ta, tb = a.configure(3, [ClientInfo("a"), ClientInfo("b")], state), again.configure(3, [ClientInfo("a"),
                                                                                        ClientInfo("b")], resumed)
    assert ta.keys() == tb.keys() and all(codec.encode(ta[c].tensors) == codec.encode(tb[c].tensors) for c in ta)
    assert all(ta[c].config == tb[c].config for c in ta) and any(k.startswith("resid/") for k in ta["a"].tensors)


# ----------------------------------------------------------------------------------- with a real model


def test_late_clients_catch_up_and_every_client_model_averages_to_the_global_one(tmp_path):
    """Clients with their own models (as daemons): each round's client trains on the server's folded base
    (hash-equal), late ones catch up by residual stacks or by D, and the server's global model, evaluated as
    a model, equals W0 + s (D + B A)."""
    cfg = tiny_cfg(tmp_path, rounds=6, extra=['strategy={name="fedex-lora", ranks=[4, 2, 4]}'])
    sc = setup.load(cfg)
    server_model = copy.deepcopy(sc.loaded.model)
    w0 = {m: w.detach().clone() for m, w in base_weights(server_model).items()}
    strat, recipe = build(cfg.strategy, setup.settings(cfg))
    spec_ = ModelSpec({n: p.detach().clone() for n, p in sc.loaded.model.named_parameters() if p.requires_grad})
    transport = OwnModels(sc.loaded.model, recipe, sc.clients)
    engine = RoundEngine(strat, transport, spec_)
    modes = {"dense": 0.0, "stacks": 0.0}
    for rnd in range(1, cfg.rounds + 1):
        want = hash_metric(content_hash({m: engine.state.tensors[m + BASE] for m in strat.modules}))
        rec = engine.run_round(rnd)
        assert not rec.rejected and rec.strategy["base_hash"] == want and rec.strategy["base_hashes_distinct"] == 1
        modes["dense"] += rec.strategy["catchup_dense"]
        modes["stacks"] += rec.strategy["catchup_residual_rounds"]
    assert modes["dense"] > 0 and modes["stacks"] > 0  # both catch-up paths were taken
    assert any(float(engine.state.tensors[m + BASE].abs().max()) > 0 for m in strat.modules)
    # the evaluated global model: live base weights W0 + s D, and the adapter B A on top of them
    recipe.prepare(server_model, Task("evaluate", engine.state.round, {}, engine.state.tensors))
    layers, name = lora_layers(server_model), server_model.encoder.active_adapter
    for m, w in base_weights(server_model).items():
        want = (w0[m].double() + 2.0 * engine.state.tensors[m + BASE].double()).to(w.dtype)  # s = 8 / 4
        assert torch.equal(w, want), m
        assert torch.equal(layers[m].lora_A[name].weight, engine.state.tensors[m + ".lora_A"])
        assert torch.equal(layers[m].lora_B[name].weight, engine.state.tensors[m + ".lora_B"])


def test_base_out_of_step_is_refused_with_one_line(tmp_path):
    cfg = tiny_cfg(tmp_path, extra=['strategy={name="fedex-lora"}'])
    sc = setup.load(cfg)
    recipe = build(cfg.strategy, setup.settings(cfg))[1]
    task = Task("train", 3, {"fedex_base_round": 2, "fedex_from": 1, "seed": 0}, {"resid/2/w": torch.zeros(1)})
    with pytest.raises(PayloadError, match="base is at round 0, but the task's residuals start after round 1"):
        recipe.prepare(sc.loaded.model, task)
    with pytest.raises(PayloadError, match="out of step"):
        recipe.prepare(sc.loaded.model, Task("train", 1, {"fedex_base_round": 0, "fedex_base_hash": "0" * 64}, {}))


def _simulate(tmp_path, name, sets):
    from fedadapt.simulation.runner import simulate

    cfg = tiny_cfg(tmp_path, rounds=4, per_round=3, extra=sets)
    setup.check(cfg)
    simulate(cfg, tmp_path / name)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return load_file(str(tmp_path / name / "model.safetensors")), rows


def test_secure_aggregation_reproduces_the_plain_run_and_client_dp_trains_within_budget(tmp_path):
    strat = 'strategy={name="fedex-lora", ranks=[4, 2]}'
    plain, _ = _simulate(tmp_path, "plain", [strat])
    masked, rows = _simulate(tmp_path, "masked", [strat, "privacy.secure_aggregation=true"])
    assert all(len(r["clients"]) == 3 and not r["rejected"] and "secagg_discarded" not in r["strategy"] for r in rows)
    for k, v in plain.items():  # fixed point (24 fraction bits) is the only difference
        assert (v.double() - masked[k].double()).abs().max() <= 1e-5, k
    assert any(float(v.abs().max()) > 0 for k, v in masked.items() if k.endswith(BASE))
    dp, rows = _simulate(tmp_path, "dp", [strat, "privacy.dp=client", "privacy.epsilon=8"])
    assert all(0 < r["strategy"]["privacy/epsilon_max"] <= 8.0 and not r["rejected"] for r in rows)
    assert any(not torch.equal(dp[k], plain[k]) for k in plain)


# ----------------------------------------------------------------------------------- real coordinator
def test_fedex_through_the_coordinator_equals_the_simulation(tmp_path):
    """3 daemons, 2 per round, ranks 4/2/4: every round's clients train on one folded base (hash-equal, checked by
    each client), late clients catch up, and the result equals the in-process simulation bit for bit."""
    data = tiny_text_file(tmp_path / "lines.jsonl", n_groups=3)
    toml = lora_run_toml(data, rounds=4, clients_per_round=2, min_clients=3,
                         extra='[strategy]\nname = "fedex-lora"\nranks = [4, 2, 4]')
    with coordinator_equals_simulation(tmp_path, toml) as (_, _, records):
        assert [len(r["clients"]) for r in records] == [2, 2, 2, 2]
        assert all(r["strategy"]["base_hashes_distinct"] == 1.0 for r in records)
        assert len({r["strategy"]["base_hash"] for r in records}) == 4  # the base moves every round
        assert sum(r["strategy"]["catchup_dense"] + r["strategy"]["catchup_residual_rounds"] for r in records) > 0


def test_coordinator_killed_mid_round_resumes_and_still_equals_the_simulation(tmp_path):
    """SIGKILL the coordinator while round 3 is under way: restarted on the same database it resumes after round
    2 from the committed state (folded base, residual stacks, what each client holds), late clients still
    catch up, and the final model equals the in-process simulation bit for bit."""
    import signal
    import time

    from deploy import Deployment

    data = tiny_text_file(tmp_path / "lines.jsonl", n_groups=3)
    toml = lora_run_toml(data, rounds=4, clients_per_round=2, min_clients=3, local_steps=40,
                         extra='[strategy]\nname = "fedex-lora"\nranks = [4, 2, 4]')
    (tmp_path / "run.toml").write_text(toml)
    d = Deployment(tmp_path, f"sqlite:///{tmp_path / 'fedadapt.db'}", tls=False)
    try:
        d.cli("simulate", tmp_path / "run.toml", "--out", tmp_path / "sim", "--threads", "1")
        names = ("role0", "role1", "role2")
        for name in names:
            d.add_client(name)
        coord = d.start_coordinator()
        clients = [d.start_client(name) for name in names]
        run_id = d.submit(toml)
        coord.wait_for("round 2 committed", timeout=180)
        deadline = time.monotonic() + 60
        while not any("round 3: train task received" in c.text() for c in clients):
            assert time.monotonic() < deadline, d.logs()
            time.sleep(0.05)
        coord.kill(signal.SIGKILL)
        assert "round 3 committed" not in coord.text()
        coord2 = d.start_coordinator()
        info = d.wait_status(run_id, ("finished", "failed"), timeout=240)
        assert info["status"] == "finished", d.logs()
        assert "resumes after committed round 2" in coord2.text(), coord2.text()
        got, want = load_file(info["model_path"]), load_file(tmp_path / "sim" / "model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        with Store(d.db_url, d.data_dir) as store:
            records = store.records(run_id)
        assert [r for r, _ in records] == [1, 2, 3, 4]
        assert all(r["strategy"]["base_hashes_distinct"] == 1.0 for _, r in records)
    finally:
        d.close()


def test_alpha_per_rank_sets_the_scaling_of_the_base_and_of_every_rank(tmp_path):
    """The option (FLoRA's name): clients apply W0 + s D and train LoRAs whose scaling is s, at every rank."""
    cfg = tiny_cfg(tmp_path, extra=['strategy={name="fedex-lora", alpha_per_rank=3.0, ranks=[2]}'])
    sc = setup.load(cfg)
    model = sc.loaded.model
    w0 = {m: w.detach().clone() for m, w in base_weights(model).items()}
    strat, recipe = build(cfg.strategy, setup.settings(cfg))
    state = strat.init_state(sc.spec)
    g = torch.Generator().manual_seed(0)
    for m in strat.modules:
        state.tensors[m + BASE] = torch.randn(state.tensors[m + BASE].shape, generator=g) * 0.01
        state.tensors[m + ".lora_B"] = torch.randn(state.tensors[m + ".lora_B"].shape, generator=g) * 0.01
    task = strat.configure(1, [ClientInfo("a", 1)], state)["a"]
    assert task.config["fedex_scaling"] == 3.0 and task.config["fedex_rank"] == 2
    task.tensors = {**task.tensors, **{m + BASE: state.tensors[m + BASE] for m in strat.modules}}  # as if it lagged
    task.config["fedex_base_hash"] = content_hash({m: state.tensors[m + BASE] for m in strat.modules})
    recipe.prepare(model, task)
    layers, name = lora_layers(model), model.encoder.active_adapter
    for m, w in base_weights(model).items():
        a, b = state.tensors[m + ".lora_A"], state.tensors[m + ".lora_B"]
        tail = b[:, 2:].double() @ a[2:].double()  # the frozen components of the rank-4 global adapter
        assert torch.equal(w, (w0[m].double() + 3.0 * (state.tensors[m + BASE].double() + tail)).to(w.dtype)), m
        assert layers[m].scaling[name] == 3.0 and layers[m].lora_A[name].weight.shape[0] == 2
