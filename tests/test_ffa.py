"""FFA-LoRA (ALGORITHMS.md §10.4): averaging B is exactly averaging the updates (fp64), A never changes (on the
server, on every client, under DP-SGD), updates stay in A's row space, the upload is B alone, a client without
the run's A refuses and then receives it, privacy modes, resume, and a real coordinator run."""

from __future__ import annotations

import json

import pytest
import torch
from deploy import coordinator_equals_simulation, lora_run_toml, tiny_text_file
from lowrank_fixtures import M1, M2, D, lora_spec, server, t
from own_models import OwnModels  # tests/own_models.py
from safetensors.torch import load_file

from fedadapt.core import codec
from fedadapt.core.config import load_config
from fedadapt.core.errors import ModelError
from fedadapt.models.lora_layers import lora_layers
from fedadapt.runtime import setup
from fedadapt.runtime.engine import RoundEngine
from fedadapt.server.store import Store
from fedadapt.strategies.base import ClientInfo, ClientResult, GlobalState
from fedadapt.strategies.ffa import A_HASH, a_hash
from fedadapt.strategies.lowrank import exported_factors

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def strategy(per_round=3, **opts):
    return server("ffa-lora", per_round, **opts)


def spec(m=5, n=4, r=2, a=None):
    return lora_spec(m, n, r, a=a)


def test_hand_example_mean_of_b_is_exactly_the_mean_update():
    s = strategy(weighting="uniform")
    a = t([[1, 2]])
    state = s.init_state(spec(m=2, n=2, r=1, a=a))
    b1, b2 = t([[1], [0]]), t([[3], [2]])
    head = {"head.weight": torch.zeros(2, 2, dtype=D), "head.bias": torch.zeros(2, dtype=D)}
    ups = [{**head, f"{M1}.lora_B": b1, f"{M2}.lora_B": b1}, {**head, f"{M1}.lora_B": b2, f"{M2}.lora_B": b2}]
    out = s.aggregate(1, [ClientResult("x", 1, ups[0]), ClientResult("y", 9, ups[1])], state).state.tensors
    assert torch.equal(out[f"{M1}.lora_B"], t([[2], [1]]))
    assert torch.equal(out[f"{M1}.lora_B"] @ out[f"{M1}.lora_A"], t([[2, 4], [1, 2]]))
    assert torch.equal(out[f"{M1}.lora_B"] @ a, 0.5 * (b1 @ a + b2 @ a))
    assert torch.equal(out[f"{M1}.lora_A"], a)  # A never changes


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_random_weighted_mean_of_b_is_the_weighted_mean_update_in_the_row_space_of_a(weighting):
    g = torch.Generator().manual_seed(5)
    s, m, n, r, ns = strategy(per_round=4, weighting=weighting), 9, 7, 3, [3, 1, 4, 1]
    state = s.init_state(spec(m, n, r))
    a = state.tensors[f"{M1}.lora_A"]
    p = [k / sum(ns) for k in ns] if weighting == "examples" else [0.25] * 4
    ups = [{"head.weight": torch.randn(2, m, generator=g, dtype=D), "head.bias": torch.randn(2, generator=g, dtype=D),
            **{f"{mod}.lora_B": torch.randn(m, r, generator=g, dtype=D) for mod in (M1, M2)}} for _ in ns]
    new = s.aggregate(1, [ClientResult(f"c{i}", k, u) for i, (k, u) in enumerate(zip(ns, ups))], state).state.tensors
    dw = new[f"{M1}.lora_B"] @ new[f"{M1}.lora_A"]
    assert (dw - sum(pk * u[f"{M1}.lora_B"] @ a for pk, u in zip(p, ups))).abs().max() <= 1e-12
    assert (dw @ (torch.eye(n, dtype=D) - torch.linalg.pinv(a) @ a)).abs().max() <= 1e-12  # row space of A
    assert int(torch.linalg.matrix_rank(dw)) <= r
    assert all(torch.equal(new[f"{mod}.lora_A"], state.tensors[f"{mod}.lora_A"]) for mod in (M1, M2))
    a2, b, scaling = exported_factors(new, None, 2.0).factors[M1]  # what `fedadapt export` writes
    assert torch.equal(b, new[f"{M1}.lora_B"]) and torch.equal(a2, a) and scaling == 2.0



def test_upload_is_b_and_the_head_only_and_a_is_sent_only_to_clients_that_lack_it():
    s = strategy(per_round=2)
    m, n, r = 5, 4, 2
    state = s.init_state(spec(m, n, r))
    contract = s.upload_contract(state)
    assert set(contract) == {"head.weight", "head.bias", f"{M1}.lora_B", f"{M2}.lora_B"}
    assert sum(v.shape[0] * v.shape[1] for k, v in contract.items() if k.endswith("lora_B")) == 2 * m * r
    tasks = s.configure(1, [ClientInfo("a"), ClientInfo("b")], state)
    assert all(not any(k.endswith(".lora_A") for k in tk.tensors) for tk in tasks.values())
    assert tasks["a"].config["ffa_a_hash"] == a_hash(state.tensors)
    up = {k: torch.zeros(v.shape, dtype=D) for k, v in contract.items()}
    out = s.aggregate(1, [ClientResult("a", 1, up)], state)  # b was asked and sent nothing valid
    out.state.round = 1
    again = s.configure(2, [ClientInfo("a"), ClientInfo("b")], out.state)
    assert f"{M1}.lora_A" in again["b"].tensors and f"{M1}.lora_A" not in again["a"].tensors
    tampered = GlobalState({**out.state.tensors, f"{M1}.lora_A": torch.ones(r, n, dtype=D)}, out.state.aux, 1)
    with pytest.raises(ModelError, match="frozen A no longer matches"):
        s.aggregate(2, [ClientResult("a", 1, up)], tampered)


def test_state_survives_a_commit(tmp_path):
    s = strategy()
    state = s.init_state(spec())
    with Store(f"sqlite:///{tmp_path / 'db'}", tmp_path / "blobs") as store:
        run = store.create_run("r", "", 5)
        store.commit_round(run, 1, state.tensors, state.aux, s.state_dict(), {}, [])
        commit = store.last_commit(run)
    again = strategy()
    again.init_state(spec())
    resumed = GlobalState(commit.tensors, commit.aux, 1)
    assert bytes(resumed.aux[A_HASH].tolist()).hex() == a_hash(state.tensors)
    a, b = s.configure(2, [ClientInfo("x")], state), again.configure(2, [ClientInfo("x")], resumed)
    assert codec.encode(a["x"].tensors) == codec.encode(b["x"].tensors) and a["x"].config == b["x"].config


# ----------------------------------------------------------------------------------- with a real model
def tiny_cfg(tmp_path, rounds=4, per_round=2, extra=()):
    data = tiny_text_file(tmp_path / "lines.jsonl", n_groups=3)
    return load_config(None, ["model.source=\"tiny-llama\"", "model.max_length=16", "adapter.rank=4",
                              "adapter.alpha=8.0", "adapter.target_modules=[]", f"data.dataset=\"{data}\"",
                              "data.group_field=\"who\"", f"rounds={rounds}", f"clients_per_round={per_round}",
                              "train.batch_size=4", "train.local_steps=2", "seed=3", 'strategy={name="ffa-lora"}',
                              *extra])


@pytest.mark.parametrize("dp", [False, True])
def test_a_never_changes_on_any_client_and_a_client_with_another_a_refuses_then_receives_it(tmp_path, dp):
    cfg = tiny_cfg(tmp_path, rounds=6, extra=["privacy.dp=client", "privacy.epsilon=8"] if dp else [])
    sc = setup.load(cfg)
    init_a = {m: lay.lora_A["default"].weight.detach().clone() for m, lay in lora_layers(sc.loaded.model).items()}
    transport = OwnModels(sc.loaded.model, sc.recipe, sc.clients)
    odd = "role1"  # this client's model has another A (e.g. built by another version): it must not train
    with torch.no_grad():
        for lay in lora_layers(transport.model(odd)).values():
            lay.lora_A["default"].weight.add_(1.0)
    engine = RoundEngine(sc.strategy, transport, sc.spec)
    refused, received = False, False
    for rnd in range(1, cfg.rounds + 1):
        rec = engine.run_round(rnd)
        if odd in rec.rejected:
            assert "frozen A does not match" in rec.rejected[odd]
            refused = True
        if odd in rec.clients:
            received = True
        assert all(not any(k.endswith(".lora_A") for k in u) for u in transport.uploads)  # B and the head only
        if dp:
            assert 0 < rec.strategy["privacy/epsilon_max"] <= 8.0
    assert refused and received  # refused once, then got A with its next task and trained
    for cid in sc.clients:  # every client's A is bit-identical to the seeded init, and so is the server's
        for m, lay in lora_layers(transport.model(cid)).items():
            assert torch.equal(lay.lora_A["default"].weight, init_a[m]) and not lay.lora_A["default"].weight.requires_grad
    assert all(torch.equal(engine.state.tensors[m + ".lora_A"], init_a[m]) for m in init_a)
    assert any(float(engine.state.tensors[m + ".lora_B"].abs().max()) > 0 for m in init_a)  # and B trained


def _simulate(tmp_path, name, sets):
    from fedadapt.simulation.runner import simulate

    cfg = tiny_cfg(tmp_path, per_round=3, extra=sets)
    setup.check(cfg)
    simulate(cfg, tmp_path / name)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return load_file(str(tmp_path / name / "model.safetensors")), rows


def test_secure_aggregation_reproduces_the_plain_run_and_central_dp_runs(tmp_path):
    plain, rows = _simulate(tmp_path, "plain", [])
    masked, mrows = _simulate(tmp_path, "masked", ["privacy.secure_aggregation=true"])
    assert all(not r["rejected"] and "secagg_discarded" not in r["strategy"] for r in mrows)
    assert mrows[0]["bytes_up"] != rows[0]["bytes_up"]  # masked int64 travelled
    for k, v in plain.items():
        assert (v.double() - masked[k].double()).abs().max() <= 1e-5, k
    central, crows = _simulate(tmp_path, "central", ["privacy.dp=central", "privacy.epsilon=8"])
    assert all(0 < r["strategy"]["privacy/epsilon"] <= 8.0 for r in crows)
    assert all(torch.equal(central[k], plain[k]) for k in plain if k.endswith(".lora_A"))  # A: never noised


# ----------------------------------------------------------------------------------- real coordinator
def test_ffa_through_the_coordinator_equals_the_simulation(tmp_path):
    data = tiny_text_file(tmp_path / "lines.jsonl", n_groups=3)
    toml = lora_run_toml(data, rounds=3, clients_per_round=2, extra='[strategy]\nname = "ffa-lora"')
    with coordinator_equals_simulation(tmp_path, toml) as (_, _, records):
        assert all(not r["rejected"] and len(r["clients"]) == 2 for r in records)
        ups = {r["bytes_up"] for r in records}
        assert len(ups) == 1  # B and the head, the same every round

