"""FlexLoRA (ALGORITHMS.md §11.4): the global adapter is exactly the weighted mean of the clients' products, each
client's factors are the best rank-r_k approximation of it (Eckart-Young, fp64, non-square modules), the QR
route equals the dense SVD, per-client ranks in tasks and contracts, privacy, resume, and a real coordinator run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from deploy import coordinator_equals_simulation, lora_run_toml, tiny_text_file
from lowrank_fixtures import M1, M2, D, lora_spec, server, t
from safetensors.torch import load_file

from fedadapt.core import codec
from fedadapt.core.config import load_config
from fedadapt.core.errors import ConfigError
from fedadapt.runtime import setup
from fedadapt.server.store import Store
from fedadapt.strategies.base import ClientInfo, ClientResult, GlobalState
from fedadapt.strategies.flexlora import global_update, product_svd
from fedadapt.strategies.lowrank import exported_factors

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def strategy(per_round=3, **opts):
    return server("flexlora", per_round, **opts)


def spec(m=6, n=5, r=2, mods=(M1, M2)):
    return lora_spec(m, n, r, mods)


def uploads(ranks, m, n, seed=0, mods=(M1, M2)):
    g = torch.Generator().manual_seed(seed)
    return [{"head.weight": torch.randn(2, m, generator=g, dtype=D), "head.bias": torch.randn(2, generator=g, dtype=D),
             **{k: v for mod in mods for k, v in ((f"{mod}.lora_A", torch.randn(r, n, generator=g, dtype=D)),
                                                   (f"{mod}.lora_B", torch.randn(m, r, generator=g, dtype=D)))}}
            for r in ranks]


def test_hand_example_best_rank_one_approximation():
    s = strategy(per_round=2, weighting="uniform")
    state = s.init_state(spec(2, 2, 1, mods=(M1,)))
    head = {"head.weight": torch.zeros(2, 2, dtype=D), "head.bias": torch.zeros(2, dtype=D)}
    ups = [{**head, f"{M1}.lora_B": t([[1], [0]]), f"{M1}.lora_A": t([[1, 1]])},
           {**head, f"{M1}.lora_B": t([[0], [1]]), f"{M1}.lora_A": t([[0, 1]])}]
    out = s.aggregate(1, [ClientResult("a", 1, ups[0]), ClientResult("b", 3, ups[1])], state)
    g = out.state.tensors
    dw = t([[0.5, 0.5], [0, 0.5]])
    assert (g[f"{M1}.lora_B"] @ g[f"{M1}.lora_A"] - dw).abs().max() <= 1e-15  # the global adapter: exact
    sigma = ((1 + math.sqrt(5)) / 4, (math.sqrt(5) - 1) / 4)
    tasks = s.configure(2, [ClientInfo("a"), ClientInfo("b")], out.state)  # both rank 1 (the run's adapter.rank)
    b, a = tasks["a"].tensors[f"{M1}.lora_B"], tasks["a"].tensors[f"{M1}.lora_A"]
    assert b.shape == (2, 1) and a.shape == (1, 2)
    assert (b @ a - t([[0.361803, 0.585410], [0.223607, 0.361803]])).abs().max() <= 1e-6  # products, not factors
    assert abs(float(torch.linalg.norm(dw - b @ a)) - sigma[1]) <= 1e-12
    assert abs(float(torch.linalg.norm(b)) - sigma[0]) <= 1e-12  # all of sigma in B, A orthonormal
    assert out.metrics["truncation_error_rel"] == pytest.approx(sigma[1] / math.hypot(*sigma), rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_each_client_gets_the_best_rank_r_approximation_of_the_weighted_mean_update(seed):
    """m = 60 != n = 40, ranks (2, 4, 8), p = (0.2, 0.3, 0.5): ||dW - B_r A_r||_F^2 = sum_{j > r} sigma_j^2."""
    m, n, ranks, ns = 60, 40, [2, 4, 8], [2, 3, 5]
    s = strategy(ranks=ranks)
    state = s.init_state(spec(m, n, 4))
    ups = uploads(ranks, m, n, seed)
    out = s.aggregate(1, [ClientResult(c, k, u) for c, k, u in zip("abc", ns, ups)], state)
    p = [k / 10 for k in ns]
    clients = [ClientInfo(c) for c in "abc"]
    tasks = s.configure(2, clients, out.state)
    for mod in (M1, M2):
        dw = sum(pk * u[f"{mod}.lora_B"] @ u[f"{mod}.lora_A"] for pk, u in zip(p, ups))
        g = out.state.tensors
        assert (g[f"{mod}.lora_B"] @ g[f"{mod}.lora_A"] - dw).abs().max() <= 1e-12  # exact global model
        assert g[f"{mod}.lora_A"].shape == (14, n) and int(torch.linalg.matrix_rank(dw)) == 14  # sum of ranks
        sigma = torch.linalg.svdvals(dw)
        for c, r in zip("abc", ranks):
            assert tasks[c].config["flexlora_rank"] == r
            b, a = tasks[c].tensors[f"{mod}.lora_B"], tasks[c].tensors[f"{mod}.lora_A"]
            assert b.shape == (m, r) and a.shape == (r, n)  # (out, in): not the transpose
            err2 = float(torch.linalg.norm(dw - b @ a) ** 2)
            assert err2 == pytest.approx(float(sigma[r:].pow(2).sum()), rel=1e-12)
            assert (a @ a.T - torch.eye(r, dtype=D)).abs().max() <= 1e-12
            assert s.task_contract(out.state, tasks[c])[f"{mod}.lora_A"].shape == (r, n)
    head = sum(pk * u["head.weight"] for pk, u in zip(p, ups))
    assert (out.state.tensors["head.weight"] - head).abs().max() <= 1e-14
    a, b, _ = exported_factors(out.state.tensors, None, 1.0).factors[M1]  # what `fedadapt export` writes
    assert b.shape == (m, 14) and a.shape == (14, n)


def test_qr_route_equals_the_dense_svd():
    g = torch.Generator().manual_seed(7)
    factors = [(torch.randn(r, 40, generator=g, dtype=D), torch.randn(60, r, generator=g, dtype=D)) for r in (2, 4, 8)]
    b, a = global_update(factors, [0.2, 0.3, 0.5])
    u, s, vh = product_svd(b, a)  # QR route: 14 < 40
    ud, sd, vhd = torch.linalg.svd(b @ a, full_matrices=False)
    assert (s - sd[:14]).abs().max() <= 1e-12 and sd[14:].abs().max() <= 1e-12
    for r in (2, 4, 8, 14):
        assert ((u[:, :r] * s[:r]) @ vh[:r] - (ud[:, :r] * sd[:r]) @ vhd[:r]).abs().max() <= 1e-12
    wide = [(torch.randn(8, 5, generator=g, dtype=D), torch.randn(6, 8, generator=g, dtype=D)) for _ in range(2)]
    u, s, vh = product_svd(*global_update(wide, [0.5, 0.5]))  # 16 >= min(6, 5): the dense SVD, 5 components
    assert s.shape == (5,) and ((u * s) @ vh - sum(0.5 * b @ a for a, b in wide)).abs().max() <= 1e-12


def test_lossless_when_every_rank_covers_the_update_and_ranks_are_capped_by_capability():
    m, n = 7, 9
    s = strategy(per_round=2, ranks=[4, 4])
    state = s.init_state(spec(m, n, 4))
    ups = uploads([2, 2], m, n, 1)  # rank(dW) <= 4
    out = s.aggregate(1, [ClientResult("a", 1, ups[0]), ClientResult("b", 1, ups[1])], state)
    tasks = s.configure(2, [ClientInfo("a"), ClientInfo("b", capabilities={"max_lora_rank": 3})], out.state)
    dw = sum(0.5 * u[f"{M1}.lora_B"] @ u[f"{M1}.lora_A"] for u in ups)
    b, a = tasks["a"].tensors[f"{M1}.lora_B"], tasks["a"].tensors[f"{M1}.lora_A"]
    assert (b @ a - dw).abs().max() <= 1e-12  # rank 4 holds all of dW (rank 2 + 2)
    assert tasks["b"].config["flexlora_rank"] == 3 and tasks["b"].tensors[f"{M1}.lora_A"].shape == (3, n)


def test_options_and_central_dp_are_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="'strategy.ranks' must be positive"):
        strategy(ranks=[2, -1])
    data = tiny_text_file(tmp_path / "lines.jsonl")
    (tmp_path / "run.toml").write_text(lora_run_toml(data, extra='[strategy]\nname = "flexlora"'))
    with pytest.raises(ConfigError, match="central.*products B_k A_k"):
        setup.check(load_config(tmp_path / "run.toml", ["privacy.dp=central", "privacy.epsilon=3"]))


def test_state_survives_a_commit(tmp_path):
    s = strategy(ranks=[2, 4, 8])
    state = s.init_state(spec(60, 40, 4))
    state = s.aggregate(1, [ClientResult(c, 1, u) for c, u in zip("abc", uploads([2, 4, 8], 60, 40))], state).state
    with Store(f"sqlite:///{tmp_path / 'db'}", tmp_path / "blobs") as store:
        run = store.create_run("r", "", 5)
        store.commit_round(run, 1, state.tensors, state.aux, s.state_dict(), {}, [])
        commit = store.last_commit(run)
    again = strategy(ranks=[2, 4, 8])
    again.init_state(spec(60, 40, 4))
    again.load_state_dict(commit.strategy_state)
    clients = [ClientInfo(c) for c in "abc"]
    a, b = s.configure(2, clients, state), again.configure(2, clients, GlobalState(commit.tensors, commit.aux, 1))
    assert all(codec.encode(a[c].tensors) == codec.encode(b[c].tensors) and a[c].config == b[c].config for c in a)


# ----------------------------------------------------------------------------------- with a real model
def _simulate(tmp_path, name, sets):
    from fedadapt.simulation.runner import simulate

    data = tiny_text_file(tmp_path / "lines.jsonl", n_groups=3)
    cfg = load_config(None, ["model.source=\"tiny-llama\"", "model.max_length=16", "adapter.rank=4",
                             "adapter.alpha=8.0", "adapter.target_modules=[]", f"data.dataset=\"{data}\"",
                             "data.group_field=\"who\"", "rounds=4", "clients_per_round=3", "train.batch_size=4",
                             "train.local_steps=2", "seed=3", 'strategy={name="flexlora", ranks=[2, 4, 8]}', *sets])
    setup.check(cfg)
    simulate(cfg, tmp_path / name)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return load_file(str(tmp_path / name / "model.safetensors")), rows


def test_secure_aggregation_reproduces_the_plain_run_and_client_dp_trains_within_budget(tmp_path):
    plain, rows = _simulate(tmp_path, "plain", [])
    assert all(r["strategy"]["global_rank"] > 4 for r in rows)  # ranks 2 + 4 + 8, capped by the module
    masked, mrows = _simulate(tmp_path, "masked", ["privacy.secure_aggregation=true"])
    assert all(not r["rejected"] and "secagg_discarded" not in r["strategy"] for r in mrows)
    for k, v in plain.items():
        if k.endswith((".lora_A", ".lora_B")):  # SVD signs are arbitrary: compare the products
            continue
        assert (v.double() - masked[k].double()).abs().max() <= 1e-5, k
    for k in (k for k in plain if k.endswith(".lora_A")):
        m = k[: -len(".lora_A")]
        prod = lambda d: d[m + ".lora_B"].double() @ d[m + ".lora_A"].double()  # noqa: B023
        assert plain[k].shape == masked[k].shape and (prod(plain) - prod(masked)).abs().max() <= 1e-4, m
    dp, rows = _simulate(tmp_path, "dp", ["privacy.dp=client", "privacy.epsilon=8"])
    assert all(0 < r["strategy"]["privacy/epsilon_max"] <= 8.0 and not r["rejected"] for r in rows)
    assert all(not torch.equal(dp[k], plain[k]) for k in plain if k.startswith("head"))  # noised steps differ


# ----------------------------------------------------------------------------------- real coordinator
def test_flexlora_through_the_coordinator_equals_the_simulation(tmp_path):
    data = tiny_text_file(tmp_path / "lines.jsonl", n_groups=3)
    toml = lora_run_toml(data, rounds=3, clients_per_round=3, extra='[strategy]\nname = "flexlora"\nranks = [2, 4, 8]')
    with coordinator_equals_simulation(tmp_path, toml) as (_, _, records):
        assert all(not r["rejected"] and len(r["clients"]) == 3 for r in records)
        assert {r["strategy"]["global_rank"] for r in records} <= {14.0, 8.0, 16.0}  # capped by tiny dims
