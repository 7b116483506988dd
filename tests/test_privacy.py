"""Privacy (issue 8): the compatibility check, client DP-SGD (exactness with no noise, accountant, budget),
secure aggregation (exact sums, what the server sees, the dropout policy) and central DP."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

from fedadapt.core import codec
from fedadapt.core.config import PrivacyConfig, load_config_text
from fedadapt.core.errors import ConfigError, ModelError
from fedadapt.models.classifier import Features
from fedadapt.models.lorasb import LoraSBLinear
from fedadapt.models.supermask import attach_supermask
from fedadapt.privacy import central_dp, secagg
from fedadapt.privacy.client_dp import ClientDP, DPSettings, _guard, _snapshot
from fedadapt.privacy.ledger import Ledger
from fedadapt.runtime import setup
from fedadapt.runtime.engine import RoundEngine
from fedadapt.runtime.executor import Executor
from fedadapt.simulation.transport import InProcessTransport
from fedadapt.strategies import private
from fedadapt.strategies.base import ClientInfo, ClientResult, GlobalState, ModelSpec, RunSettings, Task
from fedadapt.strategies.registry import build
from fedadapt.training.loop import make_optimizer, train_config, train_local

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")
D = torch.float64


# ------------------------------------------------------------------------------------------ config check
def cfg(extra: str, strategy: str = "fedavg"):
    return load_config_text(f'[strategy]\nname = "{strategy}"\n[privacy]\n{extra}\n')


@pytest.mark.parametrize("strategy,extra,why", [
    ("flora", "secure_aggregation = true", "individually"),
    ("median", "secure_aggregation = true", "median"),
    ("fedavg", 'dp = "client"', "without a budget"),
    ("fedavg", 'dp = "central"\nepsilon = inf', "without a budget"),
    ("fedavg", 'dp = "client"\nepsilon = 3\nnoise_multiplier = 0', "no noise"),
    ("fedavg", 'dp = "client"\nepsilon = 3\nmax_grad_norm = inf', "unbounded"),
    ("fedavg", 'dp = "central"\nepsilon = 3\nsecure_aggregation = true', "hides"),
    ("zo", 'dp = "client"\nepsilon = 3', "does not train through DP-SGD"),
])
def test_unsafe_combinations_are_refused_with_a_reason(strategy, extra, why):
    with pytest.raises(ConfigError, match=why):
        setup.check(cfg(extra, strategy))


def test_safe_combinations_pass_and_bad_values_name_their_key():
    for strategy in ("fedavg", "fedsb"):
        setup.check(cfg('dp = "client"\nepsilon = 3\nsecure_aggregation = true', strategy))
    with pytest.raises(ConfigError, match="privacy.dp"):
        cfg('dp = "local"')
    with pytest.raises(ConfigError, match="privacy.delta"):
        cfg("delta = 1.5")
    with pytest.raises(ConfigError, match="privacy.epsilonn"):
        cfg("epsilonn = 3")


# ------------------------------------------------------------------------------------------ tiny models
class Tiny(nn.Module):
    """Frozen base + trainable adapter (LoRA-SB core R, or a plain Linear) + trainable head, fp64."""

    def __init__(self, lorasb: bool, seq: bool = False):
        super().__init__()
        torch.manual_seed(0)  # the same starting weights for every instance
        g = torch.Generator().manual_seed(0)
        base = nn.Linear(5, 4).double()
        base.requires_grad_(False)
        if lorasb:
            b, a = torch.randn(4, 2, generator=g, dtype=D), torch.randn(2, 5, generator=g, dtype=D)
            self.encoder = LoraSBLinear(base, b, a, torch.randn(2, 2, generator=g, dtype=D))
        else:
            self.frozen, self.encoder = base, nn.Linear(4, 4).double()
        self.head = nn.Linear(4, 3).double()
        self.lorasb, self.seq = lorasb, seq

    def forward(self, x):
        h = torch.relu(self.encoder(x) if self.lorasb else self.encoder(self.frozen(x)))
        return self.head(h.mean(dim=1) if self.seq else h)


def data(n=8, seq=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 3, 5) if seq else (n, 5), generator=g, dtype=D)
    return Features({"x": x}, torch.randint(0, 3, (n,), generator=g))


def train_cfg(**kw):
    return train_config({"lr": 0.2, "local_steps": 3, "batch_size": 8, **kw})


def no_noise(**kw):
    return DPSettings(epsilon=1.0, delta=1e-5, noise_multiplier=0.0, max_grad_norm=math.inf, planned_rounds=1, **kw)


# ------------------------------------------------------------------------------------------ client DP-SGD
@pytest.mark.parametrize("lorasb,seq", [(False, False), (True, False), (True, True)])
def test_no_noise_and_no_clipping_reproduce_plain_training(lorasb, seq):
    # q = batch_size / n = 1: every Poisson batch is the whole data, as is every plain batch
    plain, dp = Tiny(lorasb, seq), Tiny(lorasb, seq)
    train_local(plain, data(seq=seq), train_cfg(), seed=5)
    ClientDP(no_noise(), Ledger(1.0, 1e-5), make_optimizer).train_local(dp, data(seq=seq), train_cfg(), seed=5)
    for (name, a), (_, b) in zip(plain.named_parameters(), dp.named_parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name
    assert not any(hasattr(p, "grad_sample") for p in dp.parameters())  # hooks and per-example grads removed


def test_lorasb_per_example_gradient_matches_autograd():
    from opacus import GradSampleModule

    import fedadapt.privacy.client_dp as client_dp

    client_dp._register_lorasb()
    model, d = Tiny(True, seq=True), data(n=4, seq=True)
    gsm = GradSampleModule(model, loss_reduction="sum", strict=False)
    torch.nn.functional.cross_entropy(gsm(**d.batch(torch.arange(4))[0]), d.labels, reduction="sum").backward()
    per = model.encoder.lorasb_R.grad_sample.clone()
    gsm._close()
    for i in range(4):
        m = Tiny(True, seq=True)
        torch.nn.functional.cross_entropy(m(x=d.inputs["x"][i : i + 1]), d.labels[i : i + 1]).backward()
        assert torch.allclose(per[i], m.encoder.lorasb_R.grad, atol=1e-12)


class TinySupermask(nn.Module):
    """FRL's model shape in miniature: every linear layer a supermask (frozen +-c weights, trained scores)."""

    def __init__(self, seq: bool = False):
        super().__init__()
        self.hidden, self.head, self.seq = nn.Linear(5, 6).double(), nn.Linear(6, 3).double(), seq
        attach_supermask(self, keep=0.5, seed=3)

    def forward(self, x):
        h = torch.relu(self.hidden(x))
        return self.head(h.mean(dim=1) if self.seq else h)


@pytest.mark.parametrize("seq", [False, True])
def test_supermask_scores_per_example_gradients_match_autograd_and_no_noise_reproduces_plain(seq):
    import fedadapt.privacy.client_dp as client_dp

    model, d = TinySupermask(seq), data(n=4, seq=seq)
    sampler = client_dp._SupermaskSamples.of(model)
    torch.nn.functional.cross_entropy(sampler(**d.batch(torch.arange(4))[0]), d.labels).backward()
    sampler.fill(4)
    per = {k: p.grad_sample.clone() for k, p in model.named_parameters() if p.requires_grad}
    sampler._close()
    for i in range(4):  # each example's own loss, through the straight-through mask
        m = TinySupermask(seq)
        torch.nn.functional.cross_entropy(m(x=d.inputs["x"][i : i + 1]), d.labels[i : i + 1]).backward()
        for k, p in m.named_parameters():
            if p.requires_grad:
                assert torch.allclose(per[k][i], p.grad, atol=1e-12), k
    plain, dp = TinySupermask(seq), TinySupermask(seq)
    train_local(plain, data(seq=seq), train_cfg(), seed=5)
    ClientDP(no_noise(), Ledger(1.0, 1e-5), make_optimizer).train_local(dp, data(seq=seq), train_cfg(), seed=5)
    for (name, a), (_, b) in zip(plain.named_parameters(), dp.named_parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name
    assert not any(hasattr(p, "grad_sample") for p in dp.parameters())


def test_ledger_epsilon_equals_opacus_accountant_for_the_same_steps():
    s = DPSettings(epsilon=8.0, delta=1e-5, noise_multiplier=1.1, max_grad_norm=1.0, planned_rounds=3)
    ledger, model, d = Ledger(8.0, 1e-5), Tiny(False), data(n=32)
    dp = ClientDP(s, ledger, make_optimizer)
    for rnd in range(2):
        dp.train_local(model, d, train_cfg(local_steps=4), seed=rnd)
    opacus_acc = RDPAccountant()
    for _ in range(8):  # what opacus' optimizer hook does after each step: q = 8 / 32
        opacus_acc.step(noise_multiplier=1.1, sample_rate=0.25)
    assert ledger.spent == pytest.approx(opacus_acc.get_epsilon(1e-5), rel=1e-12)
    # calibrated noise: the planned rounds spend the budget (opacus' search tolerance is 0.01)
    cal = ClientDP(dataclasses.replace(s, noise_multiplier=-1.0), Ledger(8.0, 1e-5), make_optimizer)
    for rnd in range(3):
        cal.train_local(model, d, train_cfg(local_steps=4), seed=rnd)
    assert 8.0 - 0.02 <= cal.ledger.spent <= 8.0


def test_guard_catches_a_moved_frozen_tensor_and_an_untouched_trainable_one():
    model = Tiny(False)
    before = _snapshot(model)
    with torch.no_grad():
        model.frozen.weight.add_(1.0)
        model.encoder.weight.add_(1.0)
        model.head.weight.add_(1.0)
    with pytest.raises(ModelError, match="frozen tensor 'frozen.weight'"):
        _guard(model, before, True)
    before = _snapshot(model)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    with pytest.raises(ModelError, match="encoder.weight"):
        _guard(model, before, True)  # with noise every trainable tensor must move
    _guard(model, before, False)  # without noise one moving is enough


# ------------------------------------------------------------------------------------------ through the engine
def mlp_run(n_clients=6, per_round=3, rounds=3, n=16, **privacy):
    """A FedAvg run of a tiny fp64 MLP through the real engine and in-process transport, under `privacy`."""
    settings = RunSettings(seed=0, rounds=rounds, clients_per_round=per_round,
                           train={"lr": 0.2, "local_steps": 2, "batch_size": 4, "optimizer": "sgd"},
                           num_clients=n_clients)
    strategy, recipe = build({"name": "fedavg", "weighting": "examples"}, settings)
    strategy, recipe = private.wrap(strategy, recipe, PrivacyConfig(**privacy), settings, "test")
    if privacy.get("secure_aggregation"):
        strategy.public_keys = {f"c{i}": recipe.public_key(f"c{i}") for i in range(n_clients)}
    model = Tiny(False)
    clients = {f"c{i}": data(n=n + i, seed=10 + i) for i in range(n_clients)}
    spec = ModelSpec({k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad})
    return RoundEngine(strategy, Recording(Executor(model, recipe), clients), spec), strategy, recipe


class Recording(InProcessTransport):
    """The in-process transport, keeping every upload exactly as the server received it."""

    seen: list

    def run(self, tasks, *, timeout):
        replies = super().run(tasks, timeout=timeout)
        self.seen = getattr(self, "seen", []) + replies
        return replies


def test_a_client_at_its_budget_is_skipped_and_the_run_goes_on():
    # budget between one and two local runs: each client trains once, then says it is exhausted
    once = Ledger(10, 1e-5)
    once.record(1.0, 4 / 16, 2)
    twice = once.would_spend(1.0, 4 / 16, 2)
    engine, strategy, recipe = mlp_run(dp="client", epsilon=(once.spent + twice) / 2, noise_multiplier=1.0, n=16,
                                       max_grad_norm=1.0)
    engine.transport.data = {k: data(n=16, seed=i) for i, k in enumerate(engine.transport.data)}
    records = [engine.run_round(r) for r in (1, 2, 3)]
    assert len(records[0].clients) == 3 and len(records[1].clients) == 3
    assert not set(records[0].clients) & set(records[1].clients)
    assert records[2].clients == [] and records[2].skipped  # nobody left with budget: the round is skipped
    for rec in records[:2]:
        eps = private.epsilon_metrics(rec.strategy)
        assert set(eps) == set(rec.clients) and all(e <= strategy.cfg.epsilon for e in eps.values())
    # a server that forgot (e.g. a fresh coordinator) asks again: the client refuses and says why
    strategy.exhausted.clear()
    rec = engine.run_round(4)
    assert rec.clients == [] and rec.per_client
    assert all(p["status"] == "rejected" and "privacy budget exhausted" in p["reason"] for p in rec.per_client.values())


def test_dp_round_trains_and_reports_the_ledger():
    engine, strategy, _ = mlp_run(dp="client", epsilon=3.0)
    start = {k: v.clone() for k, v in engine.state.tensors.items()}
    rec = engine.run_round(1)
    assert rec.clients and not rec.rejected
    assert 0 < rec.strategy["privacy/epsilon_max"] <= 3.0
    assert any(not torch.equal(start[k], v) for k, v in engine.state.tensors.items())


# ------------------------------------------------------------------------------------------ secure aggregation
def keys(n):
    ks = {f"c{i}": secagg.new_key(bytes([i + 1]) * 32) for i in range(n)}
    return ks, {c: secagg.public_hex(k) for c, k in ks.items()}


def test_secure_sum_is_exact_for_integers_and_within_fixed_point_error_otherwise():
    ks, peers = keys(5)
    g = torch.Generator().manual_seed(0)
    xs = {c: {"a": torch.randint(-1000, 1000, (3, 4), generator=g).to(D), "b": torch.randn(7, generator=g, dtype=D)}
          for c in ks}
    ups = [secagg.mask(xs[c], 1.0, me=c, key=ks[c], peers=peers, rnd=2, salt=b"s", frac_bits=24) for c in ks]
    total = secagg.unmask_sum(ups, 24, D)
    assert torch.equal(total["a"], sum(x["a"] for x in xs.values()))
    assert (total["b"] - sum(x["b"] for x in xs.values())).abs().max() <= 5 * 0.5 * 2.0**-24
    partial = secagg.unmask_sum(ups[1:], 24, D)["a"]  # one upload missing: its masks stay in, garbage
    assert (partial - sum(xs[c]["a"] for c in list(ks)[1:])).abs().min() > 1e3


def test_the_server_sees_only_masked_uploads_and_learns_the_plain_average():
    plain, _, _ = mlp_run(rounds=1)
    masked, _, _ = mlp_run(rounds=1, secure_aggregation=True)
    p_rec, m_rec = plain.run_round(1), masked.run_round(1)
    assert p_rec.clients == m_rec.clients and not m_rec.rejected
    for k, v in plain.state.tensors.items():  # the same aggregate, up to fixed-point rounding
        assert (v - masked.state.tensors[k]).abs().max() <= 1e-6
    clear = {r.client_id: codec.decode(r.payload) for r in plain.transport.seen}
    for r in masked.transport.seen:  # everything the coordinator received from each client
        seen = codec.decode(r.payload)
        assert all(t.dtype == torch.int64 for t in seen.values())
        for k, t in seen.items():
            as_fixed_point = t.double() / 2.0**24
            assert (as_fixed_point - clear[r.client_id][k] * r.num_examples).abs().min() > 1.0  # nothing lines up
            bits = (t.view(-1) >> 62) & 1
            assert 0.2 < bits.double().mean() < 0.8 or t.numel() < 8  # high bits look uniform, not small numbers


def test_a_client_missing_after_masking_discards_the_round():
    engine, strategy, _ = mlp_run(rounds=2, secure_aggregation=True)
    before = {k: v.clone() for k, v in engine.state.tensors.items()}
    inner_run = engine.transport.run
    engine.transport.run = lambda tasks, timeout: inner_run(tasks, timeout=timeout)[1:]  # the first never uploads
    rec = engine.run_round(1)
    assert rec.strategy["secagg_discarded"] == 1.0 and len(rec.clients) == 2
    assert all(torch.equal(before[k], v) for k, v in engine.state.tensors.items())


# ------------------------------------------------------------------------------------------ central DP
def test_central_clipping_bounds_each_update_and_noise_has_the_right_scale():
    ups = [{"w": torch.full((4,), 10.0, dtype=D)}, {"w": torch.full((4,), 0.1, dtype=D)}]
    total, m = central_dp.noised_sum(ups, 1.0, 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(total["w"], torch.full((4,), 0.5 + 0.1, dtype=D)) and m["central_dp_clipped"] == 0.5
    noisy, _ = central_dp.noised_sum([{"w": torch.zeros(20000, dtype=D)}], 2.0, 1.5, torch.Generator().manual_seed(0))
    assert float(noisy["w"].std()) == pytest.approx(3.0, rel=0.03)


def test_central_accountant_uses_each_rounds_real_sampling_rate():
    settings = RunSettings(seed=0, rounds=4, clients_per_round=2, train={"lr": 0.1}, num_clients=8)
    inner, _ = build({"name": "fedavg"}, settings)
    s, _ = private.wrap(inner, None, PrivacyConfig(dp="central", epsilon=4.0, noise_multiplier=2.0), settings)
    state = s.init_state(ModelSpec({"w": torch.zeros(3, dtype=D)}))
    for rnd, available in ((1, 8), (2, 4)):
        tasks = s.configure(rnd, [ClientInfo(f"c{i}") for i in range(available)], state)
        results = [ClientResult(c, 1, {"w": torch.ones(3, dtype=D)}) for c in tasks]
        out = s.aggregate(rnd, results, state)
        assert out.metrics["privacy/sample_rate"] == 2 / available
    assert s.central.ledger.history == [(2.0, 0.25, 1), (2.0, 0.5, 1)]
    # a round that would pass the budget sends no task
    s.central.ledger.history.append((2.0, 1.0, 1000))
    assert s.configure(3, [ClientInfo(f"c{i}") for i in range(8)], state) == {}


def test_fedsb_init_round_under_client_dp_is_a_noised_clipped_sum():
    # per-example gradients of the target weights, by the ghost-norm identity: checked against brute force
    from peft import LoraConfig, get_peft_model

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Linear(5, 4).double()

        def forward(self, x):
            return self.query(x)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = get_peft_model(Enc(), LoraConfig(r=2, target_modules=["query"]))
            self.head = nn.Linear(4, 3).double()

        def forward(self, x):
            return self.head(torch.relu(self.encoder(x)).mean(dim=1))

    from fedadapt.strategies.fedsb import init_gradients

    def per_example_sum(model, d, c):  # brute force: one backward per example, clipped, summed
        w = model.encoder.base_model.model.query.base_layer.weight
        w.requires_grad_(True)
        out = torch.zeros_like(w)
        for i in range(len(d)):
            w.grad = None
            torch.nn.functional.cross_entropy(model(x=d.inputs["x"][i : i + 1]), d.labels[i : i + 1]).backward()
            out += w.grad * min(1.0, c / (float(w.grad.norm()) + 1e-6))
        w.requires_grad_(False)
        w.grad = None
        return out

    model, d = M(), data(n=16, seq=True)
    model.head.requires_grad_(True)
    exact = ClientDP(no_noise(), Ledger(5.0, 1e-5), make_optimizer)
    (name, g), = exact.private_gradients(model, d, 16, 5, 3, train_cfg())[0].items()
    plain = init_gradients(model, d, 16, 16, 3)[0][name]  # one batch of 16: the mean-loss gradient
    assert name.endswith("query.grad") and torch.allclose(g, 16 * plain, atol=1e-10)
    clipped = ClientDP(dataclasses.replace(no_noise(), max_grad_norm=0.05), Ledger(5.0, 1e-5), make_optimizer)
    (_, g), = clipped.private_gradients(model, d, 16, 5, 3, train_cfg())[0].items()
    assert torch.allclose(g, per_example_sum(model, d, 0.05), atol=1e-10)
    s = DPSettings(epsilon=5.0, delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0, planned_rounds=2)
    dp = ClientDP(s, Ledger(5.0, 1e-5), make_optimizer)
    dp.private_gradients(model, d, 8, 4, 3, train_cfg())
    assert dp.ledger.history == [(1.0, 0.5, 1)]
    assert model.head.weight.requires_grad and not model.encoder.base_model.model.query.base_layer.weight.requires_grad


def test_task_gets_settings_and_recipe_wraps_only_what_is_on():
    settings = RunSettings(seed=0, rounds=2, clients_per_round=2, train={"lr": 0.1}, num_clients=2)
    inner, recipe = build({"name": "fedavg"}, settings)
    assert private.wrap(inner, recipe, PrivacyConfig(), settings) == (inner, recipe)
    s, _ = private.wrap(inner, recipe, PrivacyConfig(dp="client", epsilon=2.0), settings)
    tasks = s.configure(1, [ClientInfo("a"), ClientInfo("b")], GlobalState({"w": torch.zeros(2)}))
    assert all(t.config["privacy"]["epsilon"] == 2.0 and t.config["privacy_client"] == c for c, t in tasks.items())
    assert isinstance(next(iter(tasks.values())), Task)


def test_a_coordinator_runs_every_privacy_mode_and_refuses_unsafe_combinations():
    for extra in ('dp = "central"\nepsilon = 3', 'dp = "client"\nepsilon = 3', "secure_aggregation = true",
                  'dp = "client"\nepsilon = 3\nsecure_aggregation = true'):
        setup.check(cfg(extra), "coordinator")
    with pytest.raises(ConfigError, match="individually"):
        setup.check(cfg("secure_aggregation = true", "flora"), "coordinator")


def test_private_strategy_state_survives_a_restart():
    import json

    settings = RunSettings(seed=0, rounds=4, clients_per_round=2, train={"lr": 0.1}, num_clients=8)
    s, _ = private.wrap(build({"name": "fedavg"}, settings)[0], None,
                        PrivacyConfig(dp="central", epsilon=4.0, noise_multiplier=2.0), settings)
    s.central.ledger.record(2.0, 0.25, 3)
    s.exhausted.add("c1")
    again, _ = private.wrap(build({"name": "fedavg"}, settings)[0], None,
                            PrivacyConfig(dp="central", epsilon=4.0, noise_multiplier=2.0), settings)
    again.load_state_dict(json.loads(json.dumps(s.state_dict())))  # the store keeps it as JSON
    assert again.central.ledger.history == [(2.0, 0.25, 3)] and again.exhausted == {"c1"}


def test_fedsb_with_client_dp_and_secure_aggregation_end_to_end(tmp_path):
    """The shipped Fed-SB scenario on a tiny Llama: DP init round, DP-SGD on R, masked uploads, the ledger."""
    import json

    from fedadapt.cli import main

    words = {0: ["apple", "pear", "plum"], 1: ["storm", "sword", "blood"]}
    lines = [json.dumps({"text": " ".join(words[(g + i) % 2][(i + k) % 3] for k in range(4)),
                         "label": ["sweet", "grim"][(g + i) % 2], "who": f"role{g}"})
             for g in range(4) for i in range(12)]
    (tmp_path / "lines.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    sets = ["model.source=tiny-llama", f"data.dataset={tmp_path / 'lines.jsonl'}", "data.group_field=who",
            "adapter.target_modules=[]", "adapter.rank=2", "rounds=3", "clients_per_round=3", "train.batch_size=4",
            "strategy.init_clients=2", "strategy.init_samples=4", "strategy.init_upload=gradient",
            "privacy.dp=client", "privacy.epsilon=8",
            "privacy.secure_aggregation=true", "eval.every=1"]
    assert main(["simulate", "simulations/fedsb.toml", "--out", str(out), *[a for s in sets for a in ("--set", s)]]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["strategy"]["init_clients"] == 2.0  # the init round aggregated the (masked, noised) gradients
    for r in rows:
        assert not r["rejected"] and "secagg_discarded" not in r["strategy"]
        assert 0 < r["strategy"]["privacy/epsilon_max"] <= 8.0
    assert len(rows[-1]["clients"]) == 3


# secure aggregation for every strategy whose aggregate is a sum: the same run, masked and plain
TINY = ['model.source="mlp"', "model.hidden=[8]", 'adapter.kind="full"', 'data.dataset="synthetic"',
        'data.partition="iid"', "data.num_clients=4", "data.num_examples=120", "rounds=5", "clients_per_round=3",
        "train.batch_size=8", "train.lr=0.05", "train.local_steps=3", "seed=5", "eval.every=100"]
SUMMING = {
    # FedAU: weights from the participation estimate, applied by each client under masks; offline absences
    "fedau": ['strategy={name="fedau", weighting="fedau"}', "clients_per_round=4", 'availability.pattern="bernoulli"',
              'availability.probabilities="uniform"', "availability.mean=0.6", 'availability.absent="offline"'],
    "ferret": ['strategy={name="ferret", seeds=16}'],
    "zo": ['strategy={name="zo", seeds=32, steps=6, eps=0.01, pro=true}'],
    "frl": ['strategy={name="frl"}', 'adapter.kind="supermask"', "train.lr=0.4"],
}


@pytest.mark.parametrize("strategy", sorted(SUMMING))
def test_secure_aggregation_reproduces_the_plain_run_of_every_summing_strategy(tmp_path, strategy):
    import json

    from safetensors.torch import load_file

    from fedadapt.core.config import load_config
    from fedadapt.simulation.runner import simulate

    models, rows = {}, {}
    for masked in (False, True):
        cfg = load_config(None, [*TINY, *SUMMING[strategy], f"privacy.secure_aggregation={str(masked).lower()}"])
        setup.check(cfg)
        out = tmp_path / str(masked)
        simulate(cfg, out)
        models[masked] = load_file(str(out / "model.safetensors"))
        rows[masked] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for plain, secure in zip(rows[False], rows[True]):
        assert secure["clients"] == plain["clients"] and len(plain["clients"]) >= 2 and not secure["rejected"]
        assert "secagg_discarded" not in secure["strategy"]
        assert secure["bytes_up"] != plain["bytes_up"]  # what travelled is the masked int64 form
    for k, v in models[False].items():
        if strategy == "frl":  # rankings: reputations are integer sums, exact under fixed point
            assert torch.equal(v, models[True][k])
        else:
            assert (v.double() - models[True][k].double()).abs().max() <= 1e-5, k
    if strategy == "fedau":  # the weights clients applied were not all 1 (some intervals closed)
        assert max(r["strategy"]["weight_max"] for r in rows[True]) > 1.0


def test_secure_aggregation_with_silent_unavailable_clients_is_refused():
    from fedadapt.core.config import load_config

    cfg = load_config(None, [*TINY, *SUMMING["fedau"], 'availability.absent="silent"',
                             "privacy.secure_aggregation=true"])
    with pytest.raises(ConfigError, match="offline"):
        setup.check(cfg)


@pytest.mark.parametrize("strategy", ["ferret", "frl"])
def test_client_dp_trains_ferret_and_frl_within_the_budget(tmp_path, strategy):
    """Ferret projects, and FRL ranks, what DP-SGD trained (post-processing): the ledger holds, the model moves."""
    import json

    from fedadapt.core.config import load_config
    from fedadapt.simulation.runner import simulate

    cfg = load_config(None, [*TINY, *SUMMING[strategy], "rounds=3", 'privacy.dp="client"', "privacy.epsilon=3",
                             "privacy.secure_aggregation=true"])
    setup.check(cfg)
    simulate(cfg, tmp_path / "dp")
    rows = [json.loads(line) for line in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["clients"]) == 3 and not r["rejected"] for r in rows)
    assert 0 < max(r["strategy"]["privacy/epsilon_max"] for r in rows) <= 3.0
    if strategy == "frl":  # the vote of the DP-trained rankings moved the global ranking
        assert all(r["strategy"]["rank_stability"] < 1.0 for r in rows)
    else:  # the DP-trained updates projected on the bases: a nonzero table every round
        assert all(r["strategy"]["table_entries"] > 0 for r in rows)
