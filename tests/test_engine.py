"""The round engine validates every result before it reaches the strategy, over a fake transport."""

import torch

from fedadapt.core import codec
from fedadapt.runtime.engine import ResultMessage, RoundEngine
from fedadapt.strategies.base import ClientInfo, ModelSpec, RunSettings
from fedadapt.strategies.registry import build

D = torch.float64


class ScriptedTransport:
    """Returns, per round, whatever replies the test scripts (honest or hostile)."""

    def __init__(self, n_clients, reply):
        self.n = n_clients
        self.reply = reply
        self.sent = []

    def clients(self):
        return [ClientInfo(f"c{i}", 1) for i in range(self.n)]

    def run(self, tasks, *, timeout):
        self.sent.extend(tasks)
        return [r for t in tasks for r in self.reply(t)]


def engine(reply, *, n=3, per_round=3, min_results=1):
    server, _ = build({"name": "fedavg"}, RunSettings(0, 3, per_round, {"lr": 0.1}))
    spec = ModelSpec({"w": torch.zeros(2, dtype=D)})
    return RoundEngine(server, ScriptedTransport(n, reply), spec, min_results=min_results)


def honest(value):
    return lambda t: [ResultMessage(t.client_id, t.round, 1, {"loss": 1.0},
                                    codec.encode({"w": torch.full((2,), value, dtype=D)}))]


def test_honest_round_updates_state_and_counts_bytes():
    e = engine(honest(2.0))
    rec = e.run_round(1)
    assert torch.equal(e.state.tensors["w"], torch.full((2,), 2.0, dtype=D))
    assert rec.clients == ["c0", "c1", "c2"] and rec.rejected == {} and rec.loss == 1.0
    assert rec.bytes_down == 3 * len(codec.encode({"w": torch.zeros(2, dtype=D)}))
    assert rec.bytes_up == rec.bytes_down


def test_hostile_results_are_rejected_before_aggregation():
    def reply(t):
        good = honest(1.0)(t)[0]
        if t.client_id == "c0":
            return [good]
        if t.client_id == "c1":  # NaN, wrong shape, garbage bytes, stale round, lying sizes, impostor
            nan = torch.tensor([float("nan"), 0.0], dtype=D)
            from safetensors.torch import save

            return [ResultMessage("c1", t.round, 1, {}, save({"w": nan})),
                    ResultMessage("c1", t.round, 1, {}, codec.encode({"w": torch.zeros(3, dtype=D)})),
                    ResultMessage("c1", t.round, 1, {}, b"\x00garbage"),
                    ResultMessage("c1", t.round - 1, 1, {}, good.payload),
                    ResultMessage("c1", t.round, 10**12, {}, good.payload),
                    ResultMessage("c1", t.round, -5, {}, good.payload)]
        return [ResultMessage("intruder", t.round, 1, {}, codec.encode({"w": torch.full((2,), 1e9, dtype=D)}))]

    e = engine(reply)
    rec = e.run_round(1)
    assert rec.clients == ["c0"]
    assert set(rec.rejected) == {"c1", "intruder"}
    assert torch.equal(e.state.tensors["w"], torch.ones(2, dtype=D))  # only the honest client counted


def test_quorum_not_met_leaves_state_unchanged():
    e = engine(lambda t: [], min_results=1)
    rec = e.run_round(1)
    assert rec.skipped and torch.equal(e.state.tensors["w"], torch.zeros(2, dtype=D))


def test_duplicate_results_count_once():
    e = engine(lambda t: honest(3.0)(t) * 2, n=2, per_round=2)
    rec = e.run_round(1)
    assert rec.clients == ["c0", "c1"] and rec.rejected == {}
    assert torch.equal(e.state.tensors["w"], torch.full((2,), 3.0, dtype=D))


def test_a_later_refusal_does_not_overwrite_an_aggregated_clients_record():
    """c0's result is aggregated, then it sends a duplicate and a stale copy: its record stays accepted (every
    byte it sent still counted); c1 sends only a stale result: rejected with that reason."""
    def reply(t):
        good = honest(3.0)(t)[0]
        if t.client_id == "c0":
            return [good, good, ResultMessage("c0", t.round - 1, 1, {}, good.payload)]
        return [ResultMessage("c1", t.round - 1, 1, {}, good.payload)]

    rec = engine(reply, n=2, per_round=2).run_round(1)
    c0, c1 = rec.per_client["c0"], rec.per_client["c1"]
    assert rec.clients == ["c0"] and set(rec.rejected) == {"c1"} and "stale" in rec.rejected["c1"]
    assert c0["status"] == "accepted" and c0["reason"] == "" and c0["up"] == rec.bytes_up - c1["up"]
    assert c0["up"] == 3 * c1["up"] and c1["status"] == "rejected" and "stale" in c1["reason"]


def test_broadcast_encoded_once_per_round():
    e = engine(honest(1.0), n=5, per_round=5)
    e.run_round(1)
    payloads = {id(m.payload) for m in e.transport.sent}
    assert len(payloads) == 1
