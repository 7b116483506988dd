"""FedAvg invariants of ALGORITHMS.md §1.3, on tiny fp64 tensors."""

import itertools

import pytest
import torch

from fedadapt.strategies.aggregate import weighted_average, weights
from fedadapt.strategies.base import ClientInfo, ClientResult, GlobalState, ModelSpec, RunSettings
from fedadapt.strategies.fedavg import server_step
from fedadapt.strategies.registry import build

D = torch.float64


def strategy(**opts):
    server, _ = build({"name": "fedavg", **opts}, RunSettings(seed=0, rounds=5, clients_per_round=2,
                                                             train={"lr": 0.1}))
    return server


def result(cid, n, **tensors):
    return ClientResult(cid, n, {k: torch.as_tensor(v, dtype=D) for k, v in tensors.items()})


def test_hand_example_is_exactly_2_5():
    s = strategy()
    state = s.init_state(ModelSpec({"w": torch.tensor([0.0], dtype=D)}))
    out = s.aggregate(1, [result("a", 10, w=[1.0]), result("b", 30, w=[3.0])], state)
    assert out.state.tensors["w"].item() == 2.5


def test_uniform_weighting():
    s = strategy(weighting="uniform")
    state = s.init_state(ModelSpec({"w": torch.tensor([0.0], dtype=D)}))
    out = s.aggregate(1, [result("a", 10, w=[1.0]), result("b", 30, w=[3.0])], state)
    assert out.state.tensors["w"].item() == 2.0


@pytest.mark.parametrize("ns", [[1, 2, 3], [7], [10**6, 1, 5]])
def test_weights_sum_to_one(ns):
    for mode in ("examples", "uniform"):
        assert sum(weights(ns, mode)) == pytest.approx(1.0, abs=1e-15)


def test_server_optimiser_path_with_lr_1_momentum_0_equals_plain_fedavg_bitwise():
    g = torch.Generator().manual_seed(0)
    theta = {"w": torch.randn(4, 3, generator=g, dtype=D)}
    clients = [{"w": torch.randn(4, 3, generator=g, dtype=D)} for _ in range(3)]
    p = weights([5, 1, 9], "examples")
    avg = weighted_average(clients, p)
    new, v = server_step(theta, avg, {}, lr=1.0, momentum=0.0)
    assert torch.equal(new["w"], avg["w"]) and v == {}
    # through the strategy, too
    s = strategy(server_lr=1.0, server_momentum=0.0)
    out = s.aggregate(1, [ClientResult(str(i), n, c) for i, (n, c) in enumerate(zip([5, 1, 9], clients))],
                      GlobalState(theta))
    assert torch.equal(out.state.tensors["w"], avg["w"])


def test_server_lr_zero_leaves_model_unchanged():
    theta = {"w": torch.tensor([[1.5, -2.0]], dtype=D)}
    s = strategy(server_lr=0.0)
    out = s.aggregate(1, [result("a", 3, w=[[9.0, 9.0]]), result("b", 1, w=[[-4.0, 2.0]])], GlobalState(theta))
    assert torch.equal(out.state.tensors["w"], theta["w"])


def test_server_lr_scales_the_mean_delta():
    theta = {"w": torch.tensor([1.0], dtype=D)}
    out = strategy(server_lr=0.5).aggregate(1, [result("a", 1, w=[3.0]), result("b", 1, w=[5.0])], GlobalState(theta))
    assert out.state.tensors["w"].item() == 1.0 + 0.5 * (4.0 - 1.0)


def test_momentum_starts_with_v_equal_g_then_accumulates():
    s = strategy(server_lr=1.0, server_momentum=0.5)
    st = GlobalState({"w": torch.tensor([0.0], dtype=D)})
    st = s.aggregate(1, [result("a", 1, w=[2.0])], st).state  # g = -2, v = -2, theta = 2
    assert st.tensors["w"].item() == 2.0 and st.aux["momentum/w"].item() == -2.0
    st = s.aggregate(2, [result("a", 1, w=[3.0])], st).state  # g = -1, v = 0.5*-2 - 1 = -2, theta = 4
    assert st.aux["momentum/w"].item() == -2.0 and st.tensors["w"].item() == 4.0


def test_client_order_does_not_matter_exactly_for_integer_values():
    theta = {"w": torch.zeros(2, 2, dtype=D)}
    rs = [result("a", 2, w=[[1, 2], [3, 4]]), result("b", 6, w=[[5, -6], [7, 8]]), result("c", 8, w=[[0, 1], [1, 0]])]
    s = strategy(server_lr=0.5, server_momentum=0.25)
    outs = [s.aggregate(1, list(perm), GlobalState(theta)).state.tensors["w"] for perm in itertools.permutations(rs)]
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_non_float_buffers_taken_from_first_client():
    avg = weighted_average([{"n": torch.tensor(3), "w": torch.tensor([1.0], dtype=D)},
                            {"n": torch.tensor(9), "w": torch.tensor([3.0], dtype=D)}], [0.5, 0.5])
    assert avg["n"].item() == 3 and avg["w"].item() == 2.0


def test_configure_samples_deterministically_and_seeds_each_client():
    s = strategy()
    clients = [ClientInfo(f"c{i}", 10) for i in range(10)]
    st = GlobalState({"w": torch.zeros(1, dtype=D)})
    a = s.configure(3, clients, st)
    b = s.configure(3, list(reversed(clients)), st)  # connection order must not matter
    assert list(a) == list(b) and len(a) == 2
    assert len({t.config["seed"] for t in a.values()}) == 2
    rounds = {tuple(s.configure(r, clients, st)) for r in range(1, 30)}
    assert len(rounds) > 5  # sampling varies across rounds


def test_unknown_option_is_rejected_by_name():
    from fedadapt.core.errors import ConfigError

    with pytest.raises(ConfigError, match="strategy.server_lrr"):
        strategy(server_lrr=1.0)
    with pytest.raises(ConfigError, match="unknown strategy 'fedavgg'"):
        build({"name": "fedavgg"}, RunSettings(0, 1, 1, {"lr": 0.1}))
