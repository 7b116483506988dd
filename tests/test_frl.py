"""FRL (ALGORITHMS.md §5): the §5.4 hand example, the voting invariants, the mask convention, supermask
layers, the payload contract for rankings, persistence of the global ranking, and a small end-to-end run."""

import json

import pytest
import torch

from fedadapt.cli import main
from fedadapt.core import codec
from fedadapt.core.config import load_config
from fedadapt.core.errors import ConfigError, PayloadError
from fedadapt.models.build import build_model
from fedadapt.models.supermask import kept, ranking, supermasks, top_mask
from fedadapt.runtime.engine import ResultMessage, RoundEngine
from fedadapt.server.store import Store
from fedadapt.strategies.base import ClientResult, GlobalState, ModelSpec, RunSettings, Task
from fedadapt.strategies.frl import compact_dtype, permutation_error, reputation, vote
from fedadapt.strategies.registry import build

SETTINGS = RunSettings(seed=0, rounds=3, clients_per_round=4, train={"lr": 0.1})
U8 = torch.uint8

# §5.4: one layer of 4 edges, three clients
SCORES = {"A": [0.3, 0.2, 0.9, 0.1], "B": [0.9, 0.1, 0.5, 0.2], "C": [0.2, 0.4, 0.8, 0.1]}
RANKS = {"A": [3, 1, 0, 2], "B": [1, 3, 2, 0], "C": [3, 0, 1, 2]}


def frl():
    return build({"name": "frl"}, SETTINGS)[0]


def results(rankings: dict[str, list[int]]) -> list[ClientResult]:
    return [ClientResult(cid, 10, {"layer.scores": torch.tensor(r, dtype=U8)}) for cid, r in rankings.items()]


def state_of(rank: list[int]) -> GlobalState:
    return GlobalState({"layer.scores": torch.tensor(rank, dtype=U8)})


def test_hand_example_rankings_reputation_global_ranking_and_mask():
    for cid, s in SCORES.items():
        assert ranking(torch.tensor(s, dtype=torch.float64)).tolist() == RANKS[cid]
    ranks = [torch.tensor(r) for r in RANKS.values()]
    assert reputation(ranks).tolist() == [6, 3, 8, 1]
    out = frl().aggregate(1, results(RANKS), state_of([0, 1, 2, 3]))
    g = out.state.tensors["layer.scores"]
    assert g.tolist() == [3, 1, 0, 2] and g.dtype == U8
    assert top_mask(g, 0.5).nonzero().flatten().tolist() == [0, 2]


def test_hand_example_reverse_ranking_attacker_does_not_move_the_ranking():
    attacked = {**RANKS, "M": [2, 0, 1, 3]}  # the reverse of the honest global ranking
    assert reputation([torch.tensor(r) for r in attacked.values()]).tolist() == [7, 5, 8, 4]
    out = frl().aggregate(1, results(attacked), state_of([0, 1, 2, 3]))
    assert out.state.tensors["layer.scores"].tolist() == [3, 1, 0, 2]


def test_reputation_total_mask_size_and_unanimity_invariants():
    g = torch.Generator().manual_seed(0)
    for n, clients in ((1, 1), (7, 3), (100, 5), (257, 4)):
        ranks = [torch.randperm(n, generator=g) for _ in range(clients)]
        v = reputation(ranks)
        assert int(v.sum()) == clients * n * (n - 1) // 2
        assert sorted(vote(ranks).tolist()) == list(range(n))
        assert torch.equal(vote([ranks[0]] * clients), ranks[0])  # all agree -> that ranking
        for keep in (0.1, 0.25, 0.5, 0.9, 1.0):
            mask = top_mask(vote(ranks), keep)
            assert int(mask.sum()) == n - int((1 - keep) * n) == kept(n, keep)


def test_ties_are_broken_by_edge_id_and_client_order_does_not_matter():
    # A and B disagree exactly: every edge gets the same reputation -> identity ranking (edge id order)
    assert vote([torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0])]).tolist() == [0, 1, 2, 3]
    # edges 1 and 2 tie (V = 3, 3), edge 0 V = 0, edge 3 V = 6: the lower id goes first
    ranks = [torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 1, 3])]
    assert reputation(ranks).tolist() == [0, 3, 3, 6] and vote(ranks).tolist() == [0, 1, 2, 3]
    g = torch.Generator().manual_seed(1)
    many = [torch.randperm(50, generator=g) for _ in range(6)]
    assert torch.equal(vote(many), vote(many[::-1]))
    # large ties: sorting must be stable beyond the small-array path
    same = torch.zeros(5000, dtype=torch.int64)
    assert torch.equal(ranking(same), torch.arange(5000))


def test_compact_dtype_holds_the_layer_size():
    assert [compact_dtype(n) for n in (1, 256, 257, 2**15, 2**15 + 1, 2**31 + 1)] == [
        torch.uint8, torch.uint8, torch.int16, torch.int16, torch.int32, torch.int64]
    for n in (256, 2**15):  # the largest id fits
        assert int(torch.tensor(n - 1).to(compact_dtype(n))) == n - 1


def test_permutation_check_rejects_with_one_line_reasons():
    assert permutation_error(torch.tensor([2, 0, 1], dtype=U8)) is None
    assert "edge 1 appears 2 times" in permutation_error(torch.tensor([1, 1, 0], dtype=U8))
    assert "holds 3" in permutation_error(torch.tensor([3, 1, 0], dtype=U8))
    assert "holds -1" in permutation_error(torch.tensor([-1, 1, 0], dtype=torch.int16))


def tiny_model(**over):
    sets = ["model.source=mlp", "model.hidden=[6]", "adapter.kind=supermask", "adapter.keep=0.5"]
    cfg = load_config(None, sets + [f"{k}={v}" for k, v in over.items()])
    return build_model(cfg, num_labels=3, input_dim=5).model


def test_supermask_model_is_regenerated_from_the_seed_and_only_scores_train():
    a, b, c = tiny_model(), tiny_model(), tiny_model(seed=1)
    assert [n for n, p in a.named_parameters() if p.requires_grad] == list(supermasks(a))
    assert len(supermasks(a)) == 2  # the hidden layer and the head
    sa, sb, sc = (a.state_dict(), b.state_dict(), c.state_dict())
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if "scores" in k)
    first = a.encoder[0]
    w = first.parametrizations.weight.original
    assert first.bias is None and not w.requires_grad
    assert torch.allclose(w.abs(), torch.full_like(w, 2**0.5 / 5**0.5))  # signed constant, fan_in 5
    bound = 1 / 5**0.5
    assert float(first.parametrizations.weight[0].scores.detach().abs().max()) <= bound
    assert isinstance(a.encoder[1], torch.nn.LayerNorm) and a.encoder[1].weight is None  # non-affine
    # straight-through: the loss reaches the scores
    a(torch.randn(4, 5)).sum().backward()
    assert all(m.scores.grad is not None and m.scores.grad.abs().sum() > 0 for m in supermasks(a).values())


def test_mask_convention_is_the_top_of_the_signed_ranking():
    """Pins §5.5: after the scores are set from a ranking, the forward mask keeps the top `keep` of that
    ranking. The bottom edge has the most negative score (large |score|): a |score| mask would keep it."""
    model = tiny_model()
    masks = supermasks(model)
    name, m = next(iter(masks.items()))
    n = m.scores.numel()
    rank = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    m.set_ranking(rank)
    flat_scores = m.scores.detach().reshape(-1)
    assert torch.equal(flat_scores.sort().values, m.sigma)  # values only permuted: the multiset is sigma
    assert torch.equal(ranking(flat_scores), rank)
    assert torch.equal(m.mask().reshape(-1), top_mask(rank, 0.5))
    bottom, top = int(rank[0]), int(rank[-1])
    assert flat_scores[bottom] < 0 and abs(float(flat_scores[bottom])) > abs(float(flat_scores.median()))
    weight = model.encoder[0].weight.reshape(-1)  # the effective, masked weight
    assert weight[bottom] == 0 and weight[top] != 0
    assert int((weight != 0).sum()) == kept(n, 0.5)


def test_recipe_round_trip_uploads_permutations_in_the_compact_dtype():
    strategy, recipe = build({"name": "frl"}, SETTINGS)
    model = tiny_model()
    spec = ModelSpec({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    state = strategy.init_state(spec)
    for name, r in state.tensors.items():
        n = spec.initial[name].numel()
        assert r.dtype == compact_dtype(n) and torch.equal(r.long(), ranking(spec.initial[name]))
    from fedadapt.models.classifier import Features
    data = Features({"x": torch.randn(12, 5)}, torch.randint(0, 3, (12,)))
    task = Task("train", 1, {"lr": 0.5, "local_steps": 3, "batch_size": 4, "seed": 7}, state.tensors)
    recipe.prepare(model, task)
    out = recipe.train(model, data, task)
    codec.check_tensors(out.tensors, strategy.upload_contract(state))  # satisfies the contract
    moved = 0
    for name, r in out.tensors.items():
        assert r.dtype == state.tensors[name].dtype and sorted(r.tolist()) == list(range(r.numel()))
        moved += int((r != state.tensors[name]).sum())
    assert moved > 0  # training changed the ranking


def test_contract_takes_compact_rankings_and_refuses_the_rest():
    strategy = frl()
    state = state_of([3, 1, 0, 2])
    contract = strategy.upload_contract(state)
    ok = {"layer.scores": torch.tensor([0, 1, 2, 3], dtype=U8)}
    assert codec.decode(codec.encode(ok), contract=contract)["layer.scores"].tolist() == [0, 1, 2, 3]
    bad = {
        "dtype torch.float32, expected torch.uint8": torch.tensor([0.0, 1, 2, 3]),
        "dtype torch.int64, expected torch.uint8": torch.tensor([0, 1, 2, 3]),
        "is not a permutation of 0..3: edge 1 appears 2 times": torch.tensor([1, 1, 2, 3], dtype=U8),
        "shape (3,), expected (4,)": torch.tensor([0, 1, 2], dtype=U8),
    }
    for reason, t in bad.items():
        with pytest.raises(PayloadError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            codec.decode(codec.encode({"layer.scores": t}), contract=contract)
    # elsewhere integers are still refused where floats are expected
    fedavg = build({"name": "fedavg"}, SETTINGS)[0]
    fstate = fedavg.init_state(ModelSpec({"w": torch.zeros(4)}))
    with pytest.raises(PayloadError, match="dtype torch.uint8, expected torch.float32"):
        codec.decode(codec.encode({"w": torch.tensor([0, 1, 2, 3], dtype=U8)}),
                     contract=fedavg.upload_contract(fstate))


class Scripted:
    """A transport whose clients send fixed payloads."""

    def __init__(self, payloads):
        self.payloads = payloads

    def clients(self):
        from fedadapt.strategies.base import ClientInfo
        return [ClientInfo(c, 10) for c in self.payloads]

    def run(self, tasks, *, timeout):
        return [ResultMessage(t.client_id, t.round, 10, {}, codec.encode(self.payloads[t.client_id])) for t in tasks]


def test_engine_rejects_non_permutations_before_aggregation():
    payloads = {cid: {"layer.scores": torch.tensor(r, dtype=U8)} for cid, r in RANKS.items()}
    payloads["D"] = {"layer.scores": torch.tensor([3, 3, 3, 3], dtype=U8)}  # would outvote everyone
    engine = RoundEngine(frl(), Scripted(payloads), ModelSpec({"layer.scores": torch.tensor([0.1, 0.2, 0.3, 0.4])}))
    rec = engine.run_round(1)
    assert rec.rejected == {"D": "tensor 'layer.scores' is not a permutation of 0..3: edge 3 appears 4 times"}
    assert rec.clients == ["A", "B", "C"] and engine.state.tensors["layer.scores"].tolist() == [3, 1, 0, 2]


def test_frl_refuses_a_model_without_supermasks():
    with pytest.raises(ConfigError, match='adapter.kind = "supermask"'):
        frl().init_state(ModelSpec({"head.weight": torch.zeros(2, 2)}))


def test_global_ranking_survives_a_coordinator_restart(tmp_path):
    store = Store(tmp_path / "db.sqlite", tmp_path / "blobs")
    run = store.create_run("frl", "", 2)
    s1 = frl().aggregate(1, results(RANKS), state_of([0, 1, 2, 3])).state
    big = {"big.scores": torch.randperm(40000).to(torch.int32)}
    s1 = GlobalState({**s1.tensors, **big}, s1.aux, 1)
    store.commit_round(run, 1, s1.tensors, s1.aux, frl().state_dict(), {}, [])
    commit = Store(tmp_path / "db.sqlite", tmp_path / "blobs").last_commit(run)  # a fresh process's view
    assert commit.round == 1 and commit.tensors.keys() == s1.tensors.keys()
    for k, t in s1.tensors.items():
        assert commit.tensors[k].dtype == t.dtype and torch.equal(commit.tensors[k], t)
    resumed = GlobalState(commit.tensors, commit.aux, commit.round)
    nxt = {"A": [0, 1, 2, 3], "B": [0, 2, 1, 3]}
    a = frl().aggregate(2, results(nxt), GlobalState({"layer.scores": s1.tensors["layer.scores"]}))
    b = frl().aggregate(2, results(nxt), GlobalState({"layer.scores": resumed.tensors["layer.scores"]}))
    assert torch.equal(a.state.tensors["layer.scores"], b.state.tensors["layer.scores"])


def test_frl_learns_digits_end_to_end(tmp_path):
    out = tmp_path / "run"
    rc = main(["simulate", "simulations/frl-digits.toml", "--out", str(out), "--set", "rounds=10",
               "--set", "model.hidden=[32]", "--set", "train.local_epochs=1", "--set", "eval.every=10"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] > summary["majority_baseline"] + 0.4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # per client and round: int16 rankings of the 64x32 layer and of the 32x10 head, plus the header
    ranks = 64 * 32 * 2 + 32 * 10 * 2
    assert all(ranks < r["bytes_up"] / len(r["clients"]) < ranks + 400 for r in rows)
    assert all(0 < r["strategy"]["rank_stability"] <= 1 for r in rows)


def test_supermask_lora_on_a_text_model_runs_a_round(tmp_path):
    """The extension: rank the entries of frozen random LoRA factors (and the head) of a text model."""
    cfg = load_config(None, ["model.source=tiny-llama", "adapter.kind=supermask", "adapter.rank=2",
                             "adapter.target_modules=[\"q_proj\"]"])
    model = build_model(cfg, num_labels=2).model
    names = list(supermasks(model))
    assert len(names) == 2 * 2 + 1 and all("lora_" in n or n.startswith("head.") for n in names)
    lora_b = next(m for n, m in model.named_modules() if n.endswith("lora_B.default"))
    assert lora_b.parametrizations.weight.original.abs().min() > 0  # random factors, not peft's zero B
    assert [n for n, p in model.named_parameters() if p.requires_grad] == names
