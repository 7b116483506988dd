"""FLoRA (ALGORITHMS.md §3.4): stacking invariants on tiny fp64 tensors, the strategy's payload contract,
catch-up of clients that missed rounds (base weights hash-equal the server's), and a real coordinator run."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from deploy import coordinator_equals_simulation, lora_run_toml, tiny_text_file
from lowrank_fixtures import tiny_cfg
from own_models import OwnModels  # tests/own_models.py

from fedadapt.core import codec
from fedadapt.core.config import load_config
from fedadapt.core.errors import ConfigError, PayloadError
from fedadapt.models.lora_layers import base_weights
from fedadapt.runtime import setup
from fedadapt.runtime.engine import ResultMessage, RoundEngine
from fedadapt.server.store import Store
from fedadapt.strategies.base import ClientInfo, ClientResult, GlobalState, ModelSpec, RunSettings, Task
from fedadapt.strategies.flora import DELTA, PRUNED, naive_delta, stack, stack_delta
from fedadapt.strategies.lowrank import content_hash, hash_metric
from fedadapt.strategies.registry import build

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
D = torch.float64
M1, M2 = "enc.l0.q", "enc.l1.v"  # two LoRA modules of a fake spec


def t(x):
    return torch.tensor(x, dtype=D)


def strategy(per_round=3, **opts):
    server, _ = build({"name": "flora", **opts}, RunSettings(seed=0, rounds=5, clients_per_round=per_round,
                                                            train={"lr": 0.1}))
    return server


def spec(m=3, n=4, r=2):
    """A model spec as the runner builds it: peft-named LoRA factors of two modules plus a head."""
    g = torch.Generator().manual_seed(0)
    out = {"head.weight": torch.randn(2, m, generator=g, dtype=D), "head.bias": torch.zeros(2, dtype=D)}
    for mod in (M1, M2):
        out[f"{mod}.lora_A.default.weight"] = torch.randn(r, n, generator=g, dtype=D)
        out[f"{mod}.lora_B.default.weight"] = torch.zeros(m, r, dtype=D)
    return ModelSpec(out)


def client_upload(rank, seed, m=3, n=4, integer=False):
    g = torch.Generator().manual_seed(seed)
    draw = (lambda *s: torch.randint(-3, 4, s, generator=g).to(D)) if integer else \
        (lambda *s: torch.randn(*s, generator=g, dtype=D))
    out = {"head.weight": draw(2, m), "head.bias": draw(2)}
    for mod in (M1, M2):
        out[f"{mod}.lora_A"], out[f"{mod}.lora_B"] = draw(rank, n), draw(m, rank)
    return out


# ----------------------------------------------------------------------------------- §3.4 invariants
def test_integer_hand_example_is_exact():
    b1, a1 = t([[1], [0]]), t([[1, 2]])
    b2, a2 = torch.eye(2, dtype=D), t([[0, 1], [1, 0]])
    (a_stack, b_stack), = stack([{"m": (a1, b1)}, {"m": (a2, b2)}], [0.25, 0.75], [1.0, 1.0]).values()
    assert torch.equal(b_stack, t([[1, 1, 0], [0, 0, 1]]))
    assert torch.equal(a_stack, t([[0.25, 0.5], [0, 0.75], [0.75, 0]]))
    assert torch.equal(stack_delta(a_stack, b_stack), t([[0.25, 1.25], [0.75, 0]]))
    assert torch.equal(stack_delta(a_stack, b_stack), 0.25 * b1 @ a1 + 0.75 * b2 @ a2)


@pytest.mark.parametrize("seed", range(5))
def test_random_heterogeneous_ranks_are_exact_and_shapes_add_up(seed):
    g = torch.Generator().manual_seed(seed)
    m, n, k = 7, 5, 4
    ranks = torch.randint(1, 9, (k,), generator=g).tolist()
    factors = [{"m": (torch.randn(r, n, generator=g, dtype=D), torch.randn(m, r, generator=g, dtype=D))} for r in ranks]
    p = torch.rand(k, generator=g, dtype=D)
    p = (p / p.sum()).tolist()
    s = [0.5 + i for i in range(k)]  # a different scaling per client: folded into its block once
    (a_stack, b_stack), = stack(factors, p, s).values()
    assert a_stack.shape == (sum(ranks), n) and b_stack.shape == (m, sum(ranks))
    exact = sum(pk * sk * f["m"][1] @ f["m"][0] for f, pk, sk in zip(factors, p, s))
    assert (stack_delta(a_stack, b_stack) - exact).abs().max() <= 1e-12


def test_client_order_does_not_change_the_product():
    factors = [{"m": (torch.randint(-3, 4, (r, 3)).to(D), torch.randint(-3, 4, (4, r)).to(D))} for r in (1, 3, 2)]
    p, s = [0.25, 0.5, 0.25], [2.0, 2.0, 2.0]  # dyadic weights and integer factors: exact in fp64
    products = []
    for perm in itertools.permutations(range(3)):
        (a, b), = stack([factors[i] for i in perm], [p[i] for i in perm], [s[i] for i in perm]).values()
        products.append(stack_delta(a, b))
    assert all(torch.equal(x, products[0]) for x in products)


def test_naive_averaging_is_not_exact_but_stacking_is():
    f = [(t([[1.0, 0.0]]), t([[1.0], [0.0]])), (t([[0.0, 1.0]]), t([[0.0], [1.0]]))]
    naive = naive_delta(f, [0.5, 0.5], [1.0, 1.0])  # (B1+B2)/2 (A1+A2)/2 has cross terms
    assert torch.equal(naive, torch.full((2, 2), 0.25, dtype=D))
    (a, b), = stack([{"m": x} for x in f], [0.5, 0.5], [1.0, 1.0]).values()
    assert torch.equal(stack_delta(a, b), 0.5 * torch.eye(2, dtype=D))


# ----------------------------------------------------------------------------------- the strategy
def test_aggregate_merges_the_exact_weighted_sum_and_averages_the_head():
    s = strategy(alpha_per_rank=3.0)  # s_k = 3 for every client
    state = s.init_state(spec())
    ranks, ns = [1, 4, 2], [10, 30, 20]
    ups = [client_upload(r, i) for i, r in enumerate(ranks)]
    out = s.aggregate(1, [ClientResult(f"c{i}", n, u) for i, (n, u) in enumerate(zip(ns, ups))], state)
    p = [n / sum(ns) for n in ns]
    for mod in (M1, M2):
        exact = sum(pk * 3.0 * u[f"{mod}.lora_B"] @ u[f"{mod}.lora_A"] for pk, u in zip(p, ups))
        assert (out.state.tensors[mod + DELTA] - exact).abs().max() <= 1e-12
    head = sum(pk * u["head.weight"] for pk, u in zip(p, ups))
    assert (out.state.tensors["head.weight"] - head).abs().max() <= 1e-12
    assert out.metrics["global_rank"] == 7.0  # the sum of the ranks received
    # a 7-rank stack (7 * (3 + 4) numbers) costs more than D (3 * 4): it is not kept for catch-up
    assert int(out.state.aux[PRUNED]) == 1 and not any(k.startswith("stack/") for k in out.state.aux)
    err2 = sum(float((naive_delta([(u[f"{m}.lora_A"], u[f"{m}.lora_B"]) for u in ups], p, [3.0] * 3)
                      - sum(pk * 3.0 * u[f"{m}.lora_B"] @ u[f"{m}.lora_A"] for pk, u in zip(p, ups))).pow(2).sum())
               for m in (M1, M2))
    assert out.metrics["exactness_error"] == pytest.approx(err2 ** 0.5, rel=1e-9) and err2 > 0


def test_a_and_b_are_told_apart_by_name_even_when_dimensions_equal_the_rank():
    s = strategy(weighting="uniform", alpha_per_rank=1.0)
    state = s.init_state(spec(m=2, n=2, r=2))
    up = client_upload(2, 0, m=2, n=2)
    out = s.aggregate(1, [ClientResult("c", 1, up)], state)
    ba = up[f"{M1}.lora_B"] @ up[f"{M1}.lora_A"]
    assert not torch.allclose(ba, up[f"{M1}.lora_A"] @ up[f"{M1}.lora_B"])
    assert (out.state.tensors[M1 + DELTA] - ba).abs().max() <= 1e-12


def test_ranks_come_from_the_config_and_are_capped_by_a_declared_capability():
    s = strategy(ranks=[4, 8, 16])
    state = s.init_state(spec())
    clients = [ClientInfo("a"), ClientInfo("b"), ClientInfo("c", capabilities={"max_lora_rank": 2})]
    tasks = s.configure(1, clients, state)
    assert {c: tk.config["flora_rank"] for c, tk in tasks.items()} == {"a": 4, "b": 8, "c": 2}
    assert tasks["b"].config["flora_alpha"] == 16.0  # alpha_k = 2 r_k
    assert s.task_contract(state, tasks["b"])[f"{M1}.lora_A"].shape == (8, 4)


def test_wrong_rank_is_rejected_before_aggregation_and_the_others_still_aggregate():
    s = strategy(ranks=[1, 2, 3])

    class Transport:
        def clients(self):
            return [ClientInfo(c, 5) for c in ("a", "b", "c")]

        def run(self, tasks, *, timeout):
            out = []
            for tk in tasks:
                r = tk.config["flora_rank"] + (1 if tk.client_id == "b" else 0)  # b lies about its rank
                out.append(ResultMessage(tk.client_id, tk.round, 5, {}, codec.encode(client_upload(r, 1, m=16, n=16))))
            return out

    engine = RoundEngine(s, Transport(), spec(m=16, n=16))
    rec = engine.run_round(1)
    assert rec.clients == ["a", "c"]
    assert rec.rejected == {"b": f"tensor '{M1}.lora_A' has shape (3, 16), expected (2, 16)"}
    assert rec.strategy["global_rank"] == 1 + 3
    ua, uc = client_upload(1, 1, m=16, n=16), client_upload(3, 1, m=16, n=16)
    exact = sum(0.5 * 2.0 * u[f"{M1}.lora_B"] @ u[f"{M1}.lora_A"] for u in (ua, uc))
    assert (engine.state.tensors[M1 + DELTA] - exact).abs().max() <= 1e-12
    # b may hold any base now: its next task carries D, which fits whatever it holds
    again = s.configure(2, Transport().clients(), engine.state)
    assert M1 + DELTA in again["b"].tensors and M1 + DELTA not in again["a"].tensors


def test_late_clients_get_missed_stacks_or_the_merged_delta_whichever_is_smaller():
    s = strategy(per_round=1, ranks=[1])
    state = s.init_state(spec(m=3, n=4))
    dense_bytes = 2 * 3 * 4 * 8
    for rnd in range(1, 4):  # "a" trains every round; a rank-1 stack costs 2 * (3 + 4) * 8 bytes
        state = s.aggregate(rnd, [ClientResult("a", 1, client_upload(1, rnd))], state).state
        state.round = rnd
    both = strategy(per_round=2, ranks=[1])
    both.init_state(spec())
    tasks = both.configure(4, [ClientInfo("a"), ClientInfo("z")], state)
    # "a" missed only round 3's stack (112 bytes < 192): stacks; a fresh client missed 3 (336 bytes): D^3
    sent_a = {k for k in s._catch_up(state, 2)}
    assert sent_a == {f"stack/3/{M1}/A", f"stack/3/{M1}/B", f"stack/3/{M2}/A", f"stack/3/{M2}/B"}
    assert set(s._catch_up(state, 0)) == {M1 + DELTA, M2 + DELTA}
    assert set(tasks["a"].tensors) == sent_a | {"head.weight", "head.bias"} and tasks["a"].config["flora_from"] == 2
    assert M1 + DELTA in tasks["z"].tensors and tasks["z"].config["flora_from"] == 0
    # stacks that would cost more than D^t are pruned; older clients get D^t
    kept = sum(v.numel() * v.element_size() for k, v in state.aux.items() if k.startswith("stack/"))
    assert kept < dense_bytes and int(state.aux[PRUNED]) == 2


def test_unknown_options_are_refused_by_name():
    with pytest.raises(ConfigError, match="strategy.rank'"):
        strategy(rank=[4])
    with pytest.raises(ConfigError, match="'strategy.ranks' must be positive"):
        strategy(ranks=[4, 0])


# ----------------------------------------------------------------------------------- with a real model


def test_late_clients_catch_up_to_base_weights_hash_equal_to_the_servers(tmp_path):
    cfg = tiny_cfg(tmp_path, rounds=6, extra=['strategy={name="flora", ranks=[8, 4, 8]}'])
    sc = setup.load(cfg)
    server_model = copy.deepcopy(sc.loaded.model)
    strat, recipe = build(cfg.strategy, RunSettings(cfg.seed, cfg.rounds, cfg.clients_per_round,
                                                    dataclasses.asdict(cfg.train)))
    spec_ = ModelSpec({n: p.detach().clone() for n, p in sc.loaded.model.named_parameters() if p.requires_grad})
    transport = OwnModels(sc.loaded.model, recipe, sc.clients)
    engine = RoundEngine(strat, transport, spec_)
    modes = {"dense": 0.0, "stacks": 0.0}
    for rnd in range(1, cfg.rounds + 1):
        # the server's base at the start of the round: W^0 + D^{t-1}, applied to a model of its own
        recipe.prepare(server_model, Task("evaluate", engine.state.round, {}, engine.state.tensors))
        expected = hash_metric(content_hash(base_weights(server_model)))
        rec = engine.run_round(rnd)
        assert not rec.rejected and rec.strategy["base_hash"] == expected
        (cid,) = [c for r, c in transport.seen if r == rnd]  # the base the client trained on is the server's
        assert hash_metric(content_hash(base_weights(transport.model(cid)))) == expected
        modes["dense"] += rec.strategy["catchup_dense"]
        modes["stacks"] += rec.strategy["catchup_stack_rounds"]
    assert modes["dense"] > 0 and modes["stacks"] > 0  # both catch-up paths were taken
    # and a fresh adapter leaves the merged model exactly equal to its base: B = 0 everywhere
    enc = server_model.encoder
    assert all(float(p.abs().max()) == 0.0 for n, p in enc.named_parameters() if "lora_B" in n and p.requires_grad)
    x = sc.eval_subset.batch(torch.arange(4))[0]
    with torch.no_grad():
        with_adapter = server_model(**x)
        with enc.disable_adapter():
            assert torch.equal(server_model(**x), with_adapter)


def test_base_out_of_step_is_refused_with_one_line(tmp_path):
    cfg = tiny_cfg(tmp_path)
    sc = setup.load(cfg)
    _, recipe = build(cfg.strategy | {"name": "flora"}, RunSettings(0, 1, 1, dataclasses.asdict(cfg.train)))
    task = Task("train", 3, {"flora_rank": 2, "flora_base_round": 2, "flora_from": 1, "seed": 0}, {})
    with pytest.raises(PayloadError, match="base is at round 0, but the task's stacks start after round 1"):
        recipe.prepare(sc.loaded.model, Task("train", 3, task.config, {"stack/2/x/A": torch.zeros(1)}))
    with pytest.raises(PayloadError, match="out of step"):
        recipe.prepare(sc.loaded.model, Task("train", 1, {"flora_base_round": 0, "flora_base_hash": "0" * 64}, {}))


def test_state_survives_a_commit_and_a_fresh_strategy_resumes_identically(tmp_path):
    s = strategy(per_round=1, ranks=[1])
    state = s.init_state(spec())
    for rnd in (1, 2):
        state = s.aggregate(rnd, [ClientResult("a", 1, client_upload(1, rnd))], state).state
    with Store(f"sqlite:///{tmp_path / 'db'}", tmp_path / "blobs") as store:
        run = store.create_run("r", "", 5)
        store.commit_round(run, 1, state.tensors, state.aux, s.state_dict(), {}, [])
        commit = store.last_commit(run)
    again = strategy(per_round=1, ranks=[1])
    again.init_state(spec())
    again.load_state_dict(commit.strategy_state)
    resumed = GlobalState(commit.tensors, commit.aux, 2)
    state.round = 2
    a = s.configure(3, [ClientInfo("a"), ClientInfo("b")], state)
    b = again.configure(3, [ClientInfo("a"), ClientInfo("b")], resumed)
    assert a.keys() == b.keys() and all(codec.encode(a[c].tensors) == codec.encode(b[c].tensors) for c in a)
    assert all(a[c].config == b[c].config for c in a)


# ----------------------------------------------------------------------------------- real coordinator
def test_flora_through_the_coordinator_late_clients_catch_up(tmp_path):
    """3 daemons, 2 per round, ranks 2/4/8: every round's clients train on one base (hash-equal, checked
    against the server's merged delta by each client), late clients catch up, and the result equals
    the in-process simulation bit for bit."""
    data = tiny_text_file(tmp_path / "lines.jsonl", n_groups=3)
    toml = lora_run_toml(data, rounds=4, clients_per_round=2, min_clients=3,
                         extra='[strategy]\nname = "flora"\nranks = [2, 4, 8]')
    with coordinator_equals_simulation(tmp_path, toml) as (_, _, records):
        assert [len(r["clients"]) for r in records] == [2, 2, 2, 2]
        assert all(r["strategy"]["base_hashes_distinct"] == 1.0 for r in records)
        assert len({r["strategy"]["base_hash"] for r in records}) == 4  # the base moves every round
        assert sum(r["strategy"]["catchup_dense"] + r["strategy"]["catchup_stack_rounds"] for r in records) > 0
        assert {r["strategy"]["global_rank"] for r in records} <= {6.0, 10.0, 12.0}


# ----------------------------------------------------------------------------------- the zero-padding baseline
def test_zero_padding_baseline_truncates_then_averages_zero_padded_factors():
    s, _ = build({"name": "zeropad", "ranks": [1, 2]}, RunSettings(0, 5, 2, {"lr": 0.1}))
    state = s.init_state(spec(r=2))
    tasks = s.configure(1, [ClientInfo("a"), ClientInfo("b")], state)
    assert tasks["a"].tensors[f"{M1}.lora_A"].shape == (1, 4) and tasks["b"].tensors[f"{M1}.lora_B"].shape == (3, 2)
    assert s.task_contract(state, tasks["a"])[f"{M1}.lora_B"].shape == (3, 1)
    ua, ub = client_upload(1, 0, integer=True), client_upload(2, 1, integer=True)
    new = s.aggregate(1, [ClientResult("a", 1, ua), ClientResult("b", 3, ub)], state).state.tensors
    a = new[f"{M1}.lora_A"]
    assert torch.equal(a[0], 0.25 * ua[f"{M1}.lora_A"][0] + 0.75 * ub[f"{M1}.lora_A"][0])
    assert torch.equal(a[1], 0.75 * ub[f"{M1}.lora_A"][1])  # client a's missing row counts as zero
    assert torch.equal(new[f"{M1}.lora_B"][:, 1], 0.75 * ub[f"{M1}.lora_B"][:, 1])
    with pytest.raises(ConfigError, match="exceed the global adapter.rank 2"):
        build({"name": "zeropad", "ranks": [4]}, RunSettings(0, 5, 2, {"lr": 0.1}))[0].init_state(spec(r=2))


@pytest.mark.parametrize("scenario", ["simulations/flora.toml", "simulations/fedsb.toml"])
def test_scenario_files_are_valid(scenario):
    cfg = load_config(Path(__file__).resolve().parent.parent / scenario)
    settings = RunSettings(cfg.seed, cfg.rounds, cfg.clients_per_round, dataclasses.asdict(cfg.train))
    server, _ = build(cfg.strategy, settings)
    assert server.name == cfg.strategy["name"]
