"""Fed-SB (ALGORITHMS.md §4.6): exact averaging of R, the federated LoRA-SB initialisation (Eckart-Young),
frozen B and A (by hash), message sizes, the payload contract, and a real coordinator run."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from deploy import coordinator_equals_simulation, lora_run_toml, tiny_text_file

from fedadapt.core import codec
from fedadapt.core.config import load_config
from fedadapt.core.errors import ConfigError, ModelError, PayloadError
from fedadapt.models.lorasb import SCALE, LoraSBLinear, frozen_factors, lorasb_init
from fedadapt.runtime import setup
from fedadapt.runtime.engine import ResultMessage, RoundEngine
from fedadapt.server.store import Store
from fedadapt.strategies.base import ClientInfo, ClientResult, GlobalState, ModelSpec, RunSettings, Task
from fedadapt.strategies.fedsb import FROZEN_HASH, SIGNS, A, B, R, frozen_hash, pack_signs, unpack_votes
from fedadapt.strategies.lowrank import content_hash
from fedadapt.strategies.registry import build

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
D = torch.float64
M1, M2 = "enc.l0.q", "enc.l1.v"


def strategy(per_round=3, **opts):
    server, _ = build({"name": "fedsb", **opts}, RunSettings(seed=0, rounds=5, clients_per_round=per_round,
                                                            train={"lr": 0.1}))
    return server


def spec(m=4, n=5, r=2):
    out = {"head.weight": torch.zeros(2, m, dtype=D), "head.bias": torch.zeros(2, dtype=D)}
    for mod in (M1, M2):
        out[f"{mod}.lora_A.default.weight"] = torch.zeros(r, n, dtype=D)
        out[f"{mod}.lora_B.default.weight"] = torch.zeros(m, r, dtype=D)
    return ModelSpec(out)


def initialised(s, m=4, n=5, seed=0, clients=2):
    """Run the init round with random client gradients; returns (state, the gradients sent)."""
    state = s.init_state(spec(m, n))
    g = torch.Generator().manual_seed(seed)
    grads = [{f"{mod}.grad": torch.randn(m, n, generator=g, dtype=D) for mod in (M1, M2)} for _ in range(clients)]
    out = s.aggregate(1, [ClientResult(f"c{i}", 3, gr) for i, gr in enumerate(grads)], state)
    return out, grads


# ----------------------------------------------------------------------------------- §4.6 invariants
def test_hand_example_mean_of_r_is_exactly_the_mean_update():
    b, a = torch.tensor([[1.0, 0], [0, 1], [1, 1]], dtype=D), torch.tensor([[1.0, 0, 0], [0, 1, 0]], dtype=D)
    s = strategy(weighting="uniform")
    state = GlobalState({f"{M1}{B}": b, f"{M1}{A}": a, f"{M1}{R}": torch.zeros(2, 2, dtype=D)})
    state.aux[FROZEN_HASH] = torch.tensor(list(bytes.fromhex(frozen_hash(state.tensors))), dtype=torch.uint8)
    r1, r2 = torch.diag(torch.tensor([1.0, 0], dtype=D)), torch.diag(torch.tensor([0.0, 2], dtype=D))
    out = s.aggregate(2, [ClientResult("x", 1, {f"{M1}{R}": r1}), ClientResult("y", 9, {f"{M1}{R}": r2})], state)
    rbar = out.state.tensors[f"{M1}{R}"]
    assert torch.equal(rbar, torch.diag(torch.tensor([0.5, 1.0], dtype=D)))
    want = torch.tensor([[0.5, 0, 0], [0, 1, 0], [0.5, 1, 0]], dtype=D)
    assert torch.equal(b @ rbar @ a, want) and torch.equal(want, (b @ r1 @ a + b @ r2 @ a) / 2)


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_random_weighted_average_of_r_equals_the_weighted_average_of_updates(weighting):
    s = strategy(weighting=weighting)
    out, _ = initialised(s)
    state, g = out.state, torch.Generator().manual_seed(1)
    ns = [3, 10, 7]
    ups = [{k: torch.randn(v.shape, generator=g, dtype=D) for k, v in state.tensors.items() if not k.endswith((B, A))}
           for _ in ns]
    new = s.aggregate(2, [ClientResult(f"c{i}", n, u) for i, (n, u) in enumerate(zip(ns, ups))], state).state
    p = [n / sum(ns) for n in ns] if weighting == "examples" else [1 / 3] * 3
    for mod in (M1, M2):
        b, a = new.tensors[mod + B], new.tensors[mod + A]
        mean_update = sum(pk * b @ u[mod + R] @ a for pk, u in zip(p, ups))
        assert (b @ new.tensors[mod + R] @ a - mean_update).abs().max() <= 1e-12
    assert (new.tensors["head.weight"] - sum(pk * u["head.weight"] for pk, u in zip(p, ups))).abs().max() <= 1e-12


def test_initialisation_is_the_best_rank_r_approximation_eckart_young():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 9, generator=g, dtype=D)
    b, a, r0, kept = lorasb_init(delta, 3)
    sigma = torch.linalg.svdvals(delta)
    err = float((delta - b @ r0 @ a).pow(2).sum())
    assert err == pytest.approx(float(sigma[3:].pow(2).sum()), rel=1e-10)
    assert kept == pytest.approx(float(sigma[:3].pow(2).sum() / sigma.pow(2).sum()), rel=1e-12)
    assert torch.allclose(a @ a.T, torch.eye(3, dtype=D), atol=1e-12)
    assert torch.allclose(b.T @ b, torch.eye(3, dtype=D), atol=1e-12)
    assert torch.equal(r0, torch.diag(torch.diagonal(r0)))  # R0 is diagonal


def test_init_round_forms_the_sign_step_of_the_summed_gradients():
    s = strategy(init_lr=0.01)
    out, grads = initialised(s)
    for mod in (M1, M2):
        step = -0.01 * torch.sign(sum(gr[f"{mod}.grad"] for gr in grads))
        b, a, r0, _ = lorasb_init(step, 2)
        st = out.state.tensors
        assert torch.equal(st[mod + B], b) and torch.equal(st[mod + A], a) and torch.equal(st[mod + R], r0)
        assert (st[mod + B] @ st[mod + R] @ st[mod + A] - step).pow(2).sum() > 0  # rank 2 of a rank-4 step
    assert out.metrics["init_clients"] == 2.0 and 0 < out.metrics["init_energy_kept"] < 1
    assert bytes(out.state.aux[FROZEN_HASH].tolist()).hex() == frozen_hash(out.state.tensors)


def test_sign_votes_pack_to_one_bit_per_entry_and_unpack_exactly():
    g = torch.tensor([[0.5, -1.0, 0.0], [2.0, 1e-30, -3.0], [-0.1, 7.0, 0.2]], dtype=D)  # 9 entries: 2 bytes
    bits = pack_signs(g)
    assert bits.dtype == torch.uint8 and bits.shape == (2,)
    want = torch.tensor([[1, -1, -1], [1, 1, -1], [-1, 1, 1]], dtype=D)  # an exact 0 votes negative
    assert torch.equal(unpack_votes(bits, (3, 3)), want)


def test_sign_upload_with_one_init_client_gives_the_gradient_upload_init():
    g = torch.Generator().manual_seed(3)
    grads = {f"{mod}.grad": torch.randn(4, 5, generator=g, dtype=D) for mod in (M1, M2)}
    states = []
    for mode in ("gradient", "sign"):
        s = strategy(init_upload=mode)
        up = grads if mode == "gradient" else {k[: -len(".grad")] + SIGNS: pack_signs(v) for k, v in grads.items()}
        states.append(s.aggregate(1, [ClientResult("c0", 3, up)], s.init_state(spec())).state)
    assert states[0].tensors.keys() == states[1].tensors.keys()
    assert all(torch.equal(states[0].tensors[k], states[1].tensors[k]) for k in states[0].tensors)


def test_sign_upload_takes_the_majority_vote_and_is_32x_smaller():
    s = strategy(init_upload="sign", init_lr=0.01)
    state = s.init_state(spec())
    contract = s.upload_contract(state)
    assert contract[M1 + SIGNS].shape == (3,) and contract[M1 + SIGNS].dtype == torch.uint8  # ceil(4 * 5 / 8)
    g = torch.Generator().manual_seed(4)
    grads = [{mod: torch.randn(4, 5, generator=g, dtype=D) for mod in (M1, M2)} for _ in range(3)]
    grads[0][M1] *= 1e6  # one huge gradient outvotes nobody: each client has one vote per entry
    out = s.aggregate(1, [ClientResult(f"c{i}", 3, {m + SIGNS: pack_signs(v) for m, v in gr.items()})
                          for i, gr in enumerate(grads)], state)
    for mod in (M1, M2):
        step = -0.01 * torch.sign(sum(torch.sign(gr[mod]) for gr in grads))
        b, a, r0, _ = lorasb_init(step, 2)
        st = out.state.tensors
        assert torch.equal(st[mod + B], b) and torch.equal(st[mod + A], a) and torch.equal(st[mod + R], r0)
    big, small = strategy(init_upload="gradient"), strategy(init_upload="sign")
    big, small = (x.upload_contract(x.init_state(spec(384, 384))) for x in (big, small))
    nbytes = lambda c: sum(torch.Size(t.shape).numel() * t.dtype.itemsize for t in c.values())  # noqa: E731
    assert nbytes(big) == 64 * nbytes(small)  # fp64 gradients here: 64 bits per entry against 1


@pytest.mark.parametrize("privacy", ["secure_aggregation = true", 'dp = "central"\nepsilon = 3'])
def test_sign_upload_is_refused_where_uploads_are_summed_under_masks_or_noised(privacy):
    from fedadapt.core.config import load_config_text
    from fedadapt.runtime import setup

    text = '[strategy]\nname = "fedsb"\ninit_upload = "{}"\n[privacy]\n' + privacy
    setup.check(load_config_text(text.format("gradient")))
    with pytest.raises(ConfigError, match="init_upload = 'sign' sends packed sign bits"):
        setup.check(load_config_text(text.format("sign")))


def test_message_size_is_sum_of_r_squared_plus_head_whatever_the_number_of_clients():
    sizes = []
    for c in (2, 10):
        s = strategy(per_round=c)
        out, _ = initialised(s)
        contract = s.upload_contract(out.state)
        lowrank = sum(spec.shape[0] * spec.shape[1] for k, spec in contract.items() if k.endswith(R))
        assert lowrank == 2 * 2 ** 2  # two modules of rank 2
        sizes.append(sum(torch.Size(spec.shape).numel() for spec in contract.values()))
    assert sizes[0] == sizes[1] == 2 * 4 + 2 * 4 + 2


def test_configure_init_then_ships_frozen_factors_once_per_client():
    s = strategy(per_round=2, init_clients=1)
    state = s.init_state(spec())
    clients = [ClientInfo(c, 1) for c in ("a", "b", "c")]
    init = s.configure(1, clients, state)
    assert len(init) == 1 and all(t.config["fedsb_phase"] == "init" for t in init.values())
    out, _ = initialised(s)
    state = out.state
    first = s.configure(2, clients, state)
    assert all(f"{M1}{B}" in t.tensors for t in first.values())  # nobody holds B/A yet
    state = s.aggregate(2, [ClientResult(c, 1, {k: v for k, v in first[c].tensors.items() if not k.endswith((B, A))})
                            for c in first], state).state
    state.round = 2
    again = s.configure(3, [ClientInfo(c, 1) for c in first], state)
    assert all(f"{M1}{B}" not in t.tensors and f"{M1}{R}" in t.tensors for t in again.values())
    assert {t.config["fedsb_hash"] for t in again.values()} == {frozen_hash(state.tensors)}


def test_wrong_r_shape_is_rejected_and_the_others_aggregate():
    s = strategy()
    out, _ = initialised(s)

    class Transport:
        def clients(self):
            return [ClientInfo(c, 5) for c in ("a", "b", "c")]

        def run(self, tasks, *, timeout):
            res = []
            for tk in tasks:
                up = {k: v for k, v in codec.decode(tk.payload).items() if not k.endswith((B, A))}
                if tk.client_id == "b":
                    up[f"{M1}{R}"] = torch.zeros(3, 3, dtype=D)
                res.append(ResultMessage(tk.client_id, tk.round, 5, {}, codec.encode(up)))
            return res

    engine = RoundEngine(s, Transport(), spec())
    engine.state = out.state
    rec = engine.run_round(2)
    assert rec.rejected == {"b": f"tensor '{M1}{R}' has shape (3, 3), expected (2, 2)"} and rec.clients == ["a", "c"]
    assert rec.skipped is None
    again = s.configure(3, Transport().clients(), engine.state)  # b may have lost B/A: they are sent again
    assert f"{M1}{B}" in again["b"].tensors and f"{M1}{B}" not in again["a"].tensors


def test_corrupted_server_factors_are_detected():
    s = strategy()
    out, _ = initialised(s)
    out.state.tensors[f"{M1}{B}"][0, 0] += 1.0
    with pytest.raises(ModelError, match="no longer match"):
        s.aggregate(2, [], out.state)


def test_unknown_options_are_refused_by_name():
    with pytest.raises(ConfigError, match="strategy.alpha'"):
        strategy(alpha=4.0)  # alpha = r is fixed, not an option
    with pytest.raises(ConfigError, match="init_lr"):
        strategy(init_lr=0.0)
    with pytest.raises(ConfigError, match="init_upload"):
        strategy(init_upload="bits")


def test_alpha_equals_rank_so_the_adapted_layer_is_w0_plus_bra():
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(5, 4, bias=False)
    b, a, r = torch.randn(4, 2, generator=g), torch.randn(2, 5, generator=g), torch.randn(2, 2, generator=g)
    layer = LoraSBLinear(base, b, a, r)
    x = torch.randn(3, 5, generator=g)
    assert SCALE == 1.0
    assert torch.allclose(layer(x), x @ (base.weight + b @ r @ a).T, atol=1e-6)
    assert sorted(n for n, _ in layer.named_buffers()) == ["lorasb_A", "lorasb_B"]  # frozen: never optimised
    assert sorted(n for n, _ in layer.named_parameters()) == ["base_layer.weight", "lorasb_R"]


# ----------------------------------------------------------------------------------- with a real model
def test_clients_train_only_r_and_the_head_b_and_a_stay_bit_identical(tmp_path):
    data = tiny_text_file(tmp_path / "lines.jsonl", n_groups=2)
    cfg = load_config(None, ["model.source=\"tiny-llama\"", "model.max_length=16", "adapter.rank=4",
                             "adapter.target_modules=[]", f"data.dataset=\"{data}\"", "data.group_field=\"who\"",
                             "clients_per_round=2", "train.batch_size=4", "train.local_steps=3",
                             "strategy={name=\"fedsb\", init_samples=8}"])
    sc = setup.load(cfg)
    strat, recipe = build(cfg.strategy, RunSettings(cfg.seed, 3, 2, dataclasses.asdict(cfg.train)))
    model0 = sc.loaded.model
    spec_ = ModelSpec({n: p.detach().clone() for n, p in model0.named_parameters() if p.requires_grad})
    models = {cid: copy.deepcopy(model0) for cid in sc.clients}
    state = strat.init_state(spec_)
    for rnd in (1, 2, 3):
        tasks = strat.configure(rnd, [ClientInfo(c, len(d)) for c, d in sc.clients.items()], state)
        results = []
        for cid, task in tasks.items():
            task = Task(task.kind, rnd, task.config, codec.decode(codec.encode(task.tensors)))
            recipe.prepare(models[cid], task)
            before = content_hash(frozen_factors(models[cid]))
            r = recipe.train(models[cid], sc.clients[cid], task)
            codec.check_tensors(r.tensors, strat.task_contract(state, task))
            results.append(ClientResult(cid, r.num_examples, r.tensors, r.metrics))
            if rnd > 1:  # trained: B and A did not move, and hash-equal the server's
                assert content_hash(frozen_factors(models[cid])) == before == task.config["fedsb_hash"]
                trainable = {n for n, p in models[cid].named_parameters() if p.requires_grad}
                assert trainable == set(r.tensors) == {k for k in state.tensors if not k.endswith((B, A))}
        out = strat.aggregate(rnd, results, state)
        state = out.state
        if rnd == 1:
            r_init = {k: v for k, v in state.tensors.items() if k.endswith(R)}
    hashes = {content_hash(frozen_factors(m)) for m in models.values()}
    assert hashes == {frozen_hash(state.tensors)}
    assert all(not torch.equal(state.tensors[k], v) for k, v in r_init.items())  # R did train


def test_client_refuses_frozen_factors_that_do_not_match_their_hash(tmp_path):
    s = strategy()
    out, _ = initialised(s)
    _, recipe = build({"name": "fedsb"}, RunSettings(0, 1, 1, {"lr": 0.1}))
    bad = dict(out.state.tensors)
    bad[f"{M1}{A}"] = bad[f"{M1}{A}"] * 2
    with pytest.raises(PayloadError, match="do not match their content hash"):
        recipe.prepare(torch.nn.Module(), Task("train", 2, {"fedsb_hash": frozen_hash(out.state.tensors)}, bad))


def test_state_survives_a_commit(tmp_path):
    s = strategy()
    out, _ = initialised(s)
    with Store(f"sqlite:///{tmp_path / 'db'}", tmp_path / "blobs") as store:
        run = store.create_run("r", "", 5)
        store.commit_round(run, 1, out.state.tensors, out.state.aux, s.state_dict(), {}, [])
        commit = store.last_commit(run)
    again = strategy()
    again.init_state(spec())
    resumed = GlobalState(commit.tensors, commit.aux, 1)
    assert again.initialised(resumed) and frozen_hash(resumed.tensors) == frozen_hash(out.state.tensors)
    tasks = again.configure(2, [ClientInfo("a")], resumed)
    assert tasks["a"].config["fedsb_phase"] == "train"


# ----------------------------------------------------------------------------------- real coordinator
@pytest.mark.parametrize("init_upload", ["gradient", "sign"])
def test_fedsb_through_the_coordinator_equals_the_simulation(tmp_path, init_upload):
    data = tiny_text_file(tmp_path / "lines.jsonl", n_groups=3)
    toml = lora_run_toml(data, rounds=3, extra=f'[strategy]\nname = "fedsb"\ninit_samples = 8\ninit_upload = "{init_upload}"')
    with coordinator_equals_simulation(tmp_path, toml) as (d, run_id, records):
        with Store(d.db_url, d.data_dir) as store:
            commit = store.last_commit(run_id)
        assert records[0]["strategy"]["init_clients"] == 3.0 and all(not r["rejected"] for r in records)
        ups = [r["bytes_up"] for r in records]
        assert ups[1] == ups[2]
        if init_upload == "gradient":
            assert ups[1] * 10 < ups[0]  # R + head per client vs the one-off gradients
        assert bytes(commit.aux[FROZEN_HASH].tolist()).hex() == frozen_hash(commit.tensors)
