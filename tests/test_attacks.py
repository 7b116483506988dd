"""Simulated poisoning (simulation/attacks.py, `[attack]`) and the coordinate-wise median baseline."""

import json

import numpy as np
import pytest
import torch

from fedadapt.cli import main
from fedadapt.core import codec
from fedadapt.core.config import AttackConfig, load_config
from fedadapt.core.errors import ConfigError
from fedadapt.models.classifier import Features
from fedadapt.runtime.engine import ResultMessage, TaskMessage
from fedadapt.simulation.attacks import AttackedTransport, choose_malicious, poison_data, reverse_rankings, tamper
from fedadapt.strategies.base import ClientInfo, ClientResult, GlobalState, ModelSpec, RunSettings
from fedadapt.strategies.frl import vote
from fedadapt.strategies.median import coordinate_median
from fedadapt.strategies.registry import build

D = torch.float64
IDS = [f"c{i:02d}" for i in range(20)]


def test_malicious_clients_are_a_deterministic_function_of_the_seed():
    a = AttackConfig(kind="sign-flip", fraction=0.3)
    chosen = choose_malicious(IDS, a, seed=5)
    assert len(chosen) == 6 and chosen <= set(IDS)
    assert choose_malicious(reversed(IDS), a, seed=5) == chosen  # not the order clients are listed in
    assert choose_malicious(IDS, a, seed=6) != chosen
    assert choose_malicious(IDS, AttackConfig(kind="sign-flip", fraction=0.0), 5) == set()
    assert choose_malicious(IDS, AttackConfig(kind="none", fraction=0.5), 5) == set()
    assert len(choose_malicious(IDS, AttackConfig(kind="scale", fraction=1.0), 5)) == 20


def test_float_attacks_on_small_tensors():
    sent = {"w": torch.tensor([1.0, 2.0], dtype=D)}
    honest = {"w": torch.tensor([2.0, 0.0], dtype=D), "n": torch.tensor([3])}  # update (+1, -2)
    flip = tamper("sign-flip", honest, sent, 3.0, seed=0)
    assert flip["w"].tolist() == [-2.0, 8.0] and flip["n"].tolist() == [3]  # integers untouched
    assert tamper("scale", honest, sent, 3.0, seed=0)["w"].tolist() == [4.0, -4.0]
    # a tensor the client was not sent is attacked around zero
    assert tamper("sign-flip", {"x": torch.tensor([2.0], dtype=D)}, {}, 1.0, 0)["x"].tolist() == [-2.0]
    r1, r2 = (tamper("random", honest, sent, 0.5, seed=s)["w"] for s in (1, 1))
    assert torch.equal(r1, r2) and not torch.equal(r1, tamper("random", honest, sent, 0.5, seed=2)["w"])
    assert not torch.equal(r1, sent["w"])
    with pytest.raises(ConfigError, match="use 'reverse-ranking'"):
        tamper("sign-flip", {"r": torch.tensor([1, 0], dtype=torch.uint8)}, {}, 1.0, 0)


def test_colluders_send_the_reverse_of_their_own_vote():
    honest = [{"l.scores": torch.tensor(r, dtype=torch.uint8)} for r in ([3, 1, 0, 2], [1, 3, 2, 0], [3, 0, 1, 2])]
    forged = reverse_rankings(honest)["l.scores"]
    assert forged.tolist() == [2, 0, 1, 3] and forged.dtype == torch.uint8  # §5.4's attacker
    # one attacker among three honest clients cannot move the §5.4 ranking
    assert vote([h["l.scores"] for h in honest] + [forged]).tolist() == [3, 1, 0, 2]
    with pytest.raises(ConfigError, match="strategy 'frl'"):
        reverse_rankings([{"w": torch.zeros(3)}])


def test_label_flip_poisons_only_malicious_clients():
    data = {c: Features({"x": torch.zeros(3, 1)}, torch.tensor([0, 1, 9])) for c in ("a", "b")}
    out = poison_data(data, {"b"}, AttackConfig(kind="label-flip", fraction=0.5), num_classes=10)
    assert out["a"].labels.tolist() == [0, 1, 9] and out["b"].labels.tolist() == [9, 8, 0]
    assert poison_data(data, {"b"}, AttackConfig(kind="sign-flip", fraction=0.5), 10) is data


class Echo:
    """Every client uploads the tensors it was sent plus one."""

    def clients(self):
        return [ClientInfo(c, 1) for c in ("a", "b", "c")]

    def run(self, tasks, *, timeout):
        out = []
        for t in tasks:
            up = {k: v + 1 for k, v in codec.decode(t.payload).items()}
            out.append(ResultMessage(t.client_id, t.round, 1, {}, codec.encode(up)))
        return out


def test_attacked_transport_replaces_only_malicious_uploads():
    sent = codec.encode({"w": torch.tensor([1.0, 1.0])})
    tasks = [TaskMessage(c, 1, "train", {}, sent) for c in ("a", "b", "c")]
    honest = Echo().run(tasks, timeout=None)
    attacked = AttackedTransport(Echo(), AttackConfig(kind="sign-flip", fraction=0.4, scale=2.0), {"b"}, 0)
    replies = attacked.run(tasks, timeout=None)
    assert [r.client_id for r in replies] == ["a", "b", "c"]
    assert replies[0].payload == honest[0].payload and replies[2].payload == honest[2].payload
    assert codec.decode(replies[1].payload)["w"].tolist() == [-1.0, -1.0]  # 1 - 2 * (2 - 1)


class Fixed:
    """Clients upload fixed rankings (the §5.4 clients), whatever they are sent."""

    RANKS = {"a": [3, 1, 0, 2], "b": [1, 3, 2, 0], "c": [3, 0, 1, 2], "m": [0, 1, 2, 3], "n": [2, 1, 0, 3]}

    def clients(self):
        return [ClientInfo(c, 1) for c in self.RANKS]

    def run(self, tasks, *, timeout):
        return [ResultMessage(t.client_id, t.round, 1, {},
                              codec.encode({"l.scores": torch.tensor(self.RANKS[t.client_id], dtype=torch.uint8)}))
                for t in tasks]


def test_reverse_ranking_colluders_send_one_common_reversed_ranking():
    tasks = [TaskMessage(c, 1, "train", {}, b"") for c in Fixed.RANKS]
    attacked = AttackedTransport(Fixed(), AttackConfig(kind="reverse-ranking", fraction=0.4), {"m", "n"}, 0)
    up = {r.client_id: codec.decode(r.payload)["l.scores"].tolist() for r in attacked.run(tasks, timeout=None)}
    # m and n vote [0,1,2,3] + [2,1,0,3] -> reputations [2,2,2,6] -> [0,1,2,3]; both send its reverse
    assert up["m"] == up["n"] == [3, 2, 1, 0]
    assert all(up[c] == Fixed.RANKS[c] for c in "abc")


@pytest.mark.parametrize("override, needle", [
    ("attack.kind=poison", "'attack.kind' must be one of none, label-flip"),
    ("attack.fraction=1.5", "'attack.fraction' must be in [0, 1]"),
    ("attack.frac=0.2", "unknown config key 'attack.frac' (did you mean 'attack.fraction'?)"),
])
def test_bad_attack_config_is_one_line(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_simulation_reports_malicious_clients_per_round(tmp_path):
    def run(name, *sets):
        out = tmp_path / name
        args = ["simulate", "benchmarks/trivial.toml", "--out", str(out), "--set", "rounds=6",
                "--set", "clients_per_round=5", "--set", "train.lr=0.5", "--set", "train.local_steps=3"]
        assert main(args + [a for s in sets for a in ("--set", s)]) == 0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return json.loads((out / "summary.json").read_text()), rows

    attack = ("attack.kind=sign-flip", "attack.fraction=0.3", "attack.scale=10.0")
    clean, clean_rows = run("clean")
    fedavg, rows = run("fedavg", *attack)
    median, _ = run("median", *attack, "strategy.name=median")
    bad = choose_malicious([f"client-{i:03d}" for i in range(10)], AttackConfig(kind="sign-flip", fraction=0.3), 0)
    assert fedavg["malicious_clients"] == 3 and clean["malicious_clients"] == 0
    assert [r["malicious"] for r in rows] == [len(bad & set(r["clients"])) for r in rows]
    assert sum(r["malicious"] for r in rows) > 0 and all(r["malicious"] == 0 for r in clean_rows)
    # 30% sign-flipped x10: the mean is dragged the wrong way, the median is not
    assert fedavg["accuracy"] < clean["accuracy"] - 0.2
    assert median["accuracy"] > clean["accuracy"] - 0.1


# ---------------------------------------------------------------- coordinate-wise median

def test_median_odd_even_and_numpy_reference():
    odd = [{"w": torch.tensor([v, -v], dtype=D)} for v in (5.0, 1.0, 3.0)]
    assert coordinate_median(odd)["w"].tolist() == [3.0, -3.0]
    even = [{"w": torch.tensor([v], dtype=D)} for v in (4.0, 1.0, 2.0, 8.0)]
    assert coordinate_median(even)["w"].tolist() == [3.0]  # the mean of the two middle values, as numpy
    g = torch.Generator().manual_seed(0)
    many = [{"a": torch.randn(3, 4, generator=g, dtype=D)} for _ in range(6)]
    ref = np.median(np.stack([m["a"].numpy() for m in many]), axis=0)
    assert np.array_equal(coordinate_median(many)["a"].numpy(), ref)
    ints = [{"n": torch.tensor([i])} for i in (7, 1, 2)]
    assert coordinate_median(ints)["n"].tolist() == [7]  # counters: the first client's


def test_median_stays_in_the_honest_range_with_a_minority_of_outliers():
    honest = [1.0, 2.0, 3.0]
    models = [{"w": torch.tensor([v], dtype=D)} for v in honest + [1e6, -1e6 + 1]]
    assert min(honest) <= float(coordinate_median(models)["w"]) <= max(honest)


def test_median_strategy_is_registered_without_options():
    settings = RunSettings(0, 1, 3, {"lr": 0.1})
    strategy, _ = build({"name": "median"}, settings)
    state = strategy.init_state(ModelSpec({"w": torch.zeros(1, dtype=D)}))
    res = [ClientResult(c, n, {"w": torch.tensor([v], dtype=D)}) for c, n, v in (("a", 1000, 9.0), ("b", 1, 1.0),
                                                                                   ("c", 1, 2.0))]
    out = strategy.aggregate(1, res, state)
    assert out.state.tensors["w"].tolist() == [2.0]  # example counts do not buy influence
    assert isinstance(out.state, GlobalState) and out.state.round == 1
    with pytest.raises(ConfigError, match="unknown config key 'strategy.weighting'"):
        build({"name": "median", "weighting": "uniform"}, settings)
