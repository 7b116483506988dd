"""Simulated client availability: seeded, a pure function of (seed, round, client), with the long-run
rates it promises, reported per round, and configured with one-line errors."""

import json

import pytest
import torch

from fedadapt.cli import main
from fedadapt.core.config import AvailabilityConfig, load_config
from fedadapt.core.errors import ConfigError
from fedadapt.simulation.availability import Availability, from_config, probabilities

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
IDS = [f"c{i}" for i in range(6)]
P = dict(zip(IDS, [0.02, 0.1, 0.25, 0.5, 0.9, 1.0]))


def matrix(pattern, seed=0, rounds=200, order=1, **kw):
    a = Availability(AvailabilityConfig(pattern=pattern, **kw), seed, P)
    rnds = range(1, rounds + 1)[::order]
    got = {(r, c): a.available(r, c) for r in rnds for c in IDS}
    return [[got[r, c] for c in IDS] for r in range(1, rounds + 1)]


@pytest.mark.parametrize("pattern", ["bernoulli", "markov", "cyclic"])
def test_same_seed_same_pattern_any_query_order_other_seed_differs(pattern):
    a = matrix(pattern)
    assert a == matrix(pattern, order=-1)  # rounds asked last-to-first: a resumed run sees the same
    assert a != matrix(pattern, seed=1)


@pytest.mark.parametrize("pattern, rounds, tol", [("bernoulli", 6000, 0.03), ("markov", 20000, 0.06)])
def test_long_run_rate_is_p(pattern, rounds, tol):
    m = torch.tensor(matrix(pattern, rounds=rounds, markov_rate=0.2), dtype=torch.float64).mean(0)
    a = Availability(AvailabilityConfig(pattern=pattern), 0, P)
    for i, cid in enumerate(IDS):
        assert a.rate(cid) == P[cid]
        assert m[i].item() == pytest.approx(P[cid], abs=tol)


def test_markov_is_bursty_bernoulli_is_not():
    """Markov on/off at a small switching rate keeps a client's state for many rounds."""
    def switches(pattern):
        m = matrix(pattern, rounds=2000, markov_rate=0.02)
        return sum(m[r][3] != m[r + 1][3] for r in range(len(m) - 1))
    assert switches("markov") < switches("bernoulli") / 5


def test_cyclic_is_an_exact_block_per_cycle():
    m = matrix("cyclic", rounds=400, period=20)
    a = Availability(AvailabilityConfig(pattern="cyclic", period=20), 0, P)
    for i, cid in enumerate(IDS):
        active, cycle = a._cycle(P[cid])
        col = [row[i] for row in m]
        assert sum(col[:cycle]) == active and sum(col[cycle:2 * cycle]) == active
        assert col[:cycle] == col[cycle:2 * cycle]
        assert a.rate(cid) == active / cycle


def test_probabilities_follow_the_label_mix_with_floor_and_cap():
    labels = {f"k{i}": torch.full((10,), i % 5) for i in range(50)}  # client k_i holds only class i % 5
    cfg = AvailabilityConfig(pattern="bernoulli", probabilities="labels", mean=0.2, floor=0.05, alpha=0.5)
    p = probabilities(cfg, 3, labels, num_classes=5)
    assert p == probabilities(cfg, 3, labels, num_classes=5) and p != probabilities(cfg, 4, labels, 5)
    for i in range(50):  # same classes, same availability
        assert p[f"k{i}"] == p[f"k{i % 5}"]
    assert all(0.05 <= v <= 1.0 for v in p.values())
    assert len(set(p.values())) > 1
    mixed = probabilities(cfg, 3, {"m": torch.arange(5)}, 5)["m"]  # one example of each class
    assert mixed == pytest.approx(max(0.05, 0.2))  # mean * C * (1/C) * sum(q) = mean
    uniform = probabilities(AvailabilityConfig(pattern="markov", probabilities="uniform", mean=0.3), 0, labels, 5)
    assert set(uniform.values()) == {0.3}
    assert set(probabilities(AvailabilityConfig(), 0, labels, 5).values()) == {1.0}  # "always"
    assert from_config(AvailabilityConfig(), 0, labels, 5).count(7) == 50


@pytest.mark.parametrize("override, needle", [
    ("availability.patern=bernoulli",
     "unknown config key 'availability.patern' (did you mean 'availability.pattern'?)"),
    ("availability.pattern=sometimes", "config key 'availability.pattern' must be one of"),
    ("availability.mean=0", "config key 'availability.mean' must be in (0, 1]"),
    ("availability.period=1", "'availability.period' must be >= 2"),
])
def test_bad_availability_config_is_one_line(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("benchmarks/trivial.toml", [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_simulation_reports_availability_and_fedau_learns_from_who_answered(tmp_path):
    def run(name, *extra):
        out = tmp_path / name
        rc = main(["simulate", "benchmarks/trivial.toml", "--out", str(out), "--threads", "1",
                   "--set", "rounds=8", "--set", "strategy.name=\"fedau\"",
                   "--set", "availability.pattern=\"bernoulli\"",
                   "--set", "availability.probabilities=\"uniform\"", "--set", "availability.mean=0.4", *extra])
        assert rc == 0
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    rows = run("a")
    cfg = load_config("benchmarks/trivial.toml", ["availability.pattern=\"bernoulli\"",
                                                  "availability.probabilities=\"uniform\"", "availability.mean=0.4"])
    avail = from_config(cfg.availability, cfg.seed, {f"client-{i:03d}": torch.zeros(1, dtype=torch.long)
                                                     for i in range(10)}, 4)
    for row in rows:  # every client is asked (clients_per_round = 10); exactly the available ones answer
        expected = sorted(c for c in avail.p if avail.available(row["round"], c))
        assert row["available"] == len(expected)
        assert row["clients"] == expected
        assert all(v["status"] == "failed" for c, v in row["per_client"].items() if c not in expected)
        if expected:
            assert row["strategy"]["participants"] == len(expected) and row["strategy"]["num_clients"] == 10
    assert any(r["strategy"].get("weight_max", 1) > 1 for r in rows)  # someone came back after a gap
    assert len({r["available"] for r in rows}) > 1
    assert [r["clients"] for r in run("b")] == [r["clients"] for r in rows]  # seeded
    # offline: unavailable clients are not connected, so they are never asked; the same ones take part
    offline = run("c", "--set", "availability.absent=\"offline\"")
    assert [r["clients"] for r in offline] == [r["clients"] for r in rows]
    assert all(set(r["per_client"]) == set(r["clients"]) for r in offline)
    assert sum(r["bytes_down"] for r in offline) < sum(r["bytes_down"] for r in rows)
    assert main(["simulate", "benchmarks/trivial.toml", "--out", str(tmp_path / "k"), "--set", "rounds=2",
                 "--set", "strategy.name=\"fedau\"", "--set", "strategy.weighting=\"known\""]) == 0
