"""runtime/executor.py: one task on one client, and the same outcome on every path that runs tasks.

The NaN/Inf policy, validation and encoding of a client's result live in the executor only; the simulator,
the client daemon (over real gRPC on 127.0.0.1) and Flower's ClientApp all call it, so a client whose training
diverges is recorded the same way, with the same reason, and the round aggregates the same others, bit for bit.
"""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
from deploy import lora_run_toml, tiny_text_file  # tests/deploy.py
from nan_recipe import NaNFor  # tests/nan_recipe.py
from safetensors.torch import load_file

from fedadapt.core import codec
from fedadapt.core.config import load_config
from fedadapt.core.errors import ModelError, PayloadError
from fedadapt.loopback import grpc_transport
from fedadapt.runtime.engine import TaskMessage
from fedadapt.runtime.executor import REFUSED, Executor
from fedadapt.simulation import runner
from fedadapt.strategies.base import ClientResult, RecipeBase

D = torch.float64


class Scripted(RecipeBase):
    """A recipe that uploads what the test says (or raises it)."""

    def __init__(self, upload):
        self.upload = upload

    def prepare(self, model, task):
        if "bad" in task.tensors:
            raise ModelError("adapter state does not fit the model")

    def train(self, model, data, task, privacy=None):
        up = self.upload() if callable(self.upload) else self.upload
        return ClientResult("", len(data), up, {"loss": 0.5})

    def evaluate(self, model, data, task):
        return {"accuracy": 1.0}


def task(kind="train", tensors=None) -> TaskMessage:
    return TaskMessage("c1", 3, kind, {"seed": 1}, codec.encode(tensors if tensors is not None else {}))


def test_a_finite_result_is_encoded_as_is():
    up = {"w": torch.tensor([1.0, -2.0], dtype=D)}
    r = Executor(None, Scripted(up)).run(task(), [0] * 5)
    assert (r.client_id, r.round, r.num_examples, r.metrics) == ("c1", 3, 5, {"loss": 0.5})
    assert r.payload == codec.encode(up)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_diverged_result_is_answered_with_the_reason_and_no_tensors(bad):
    r = Executor(None, Scripted({"w": torch.tensor([1.0, bad])})).run(task(), [0] * 5)
    assert r.metrics == {REFUSED: "local training diverged: tensor 'w' contains NaN or Inf"}
    assert codec.decode(r.payload) == {} and r.num_examples == 5


def test_a_task_that_does_not_fit_is_refused_and_a_recipe_bug_raises():
    r = Executor(None, Scripted({})).run(task(tensors={"bad": torch.zeros(1)}), [0] * 2)
    assert r.metrics[REFUSED] == "cannot run the task: adapter state does not fit the model"
    r = Executor(None, Scripted({})).run(TaskMessage("c1", 1, "train", {}, b"\x00garbage"), [0] * 2)
    assert r.metrics[REFUSED].startswith("cannot run the task: payload is not valid safetensors")
    with pytest.raises(PayloadError, match="unsupported dtype"):  # no client could send it: a bug, not a value
        Executor(None, Scripted({"c": torch.tensor([1 + 1j])})).run(task(), [0])


def test_evaluation_returns_metrics_and_no_payload():
    r = Executor(None, Scripted({})).run(task("evaluate"), [0] * 4)
    assert (r.metrics, r.num_examples, r.payload) == ({"accuracy": 1.0}, 4, b"")


# ------------------------------------------------------------------------------------------ every path
BAD = 1  # the second client (in id order) diverges


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("executor")
    path = tmp / "fedavg.toml"
    path.write_text(lora_run_toml(tiny_text_file(tmp / "lines.jsonl"), rounds=1, clients_per_round=3))
    return path


def simulated(scenario, out, transport) -> tuple[dict, dict[str, list[float]]]:
    """One round of the scenario with the BAD client diverging, through `transport`: its record and model."""
    def diverging(run, data, done):
        run.executor.recipe = NaNFor(run.executor.recipe, data[sorted(data)[BAD]])
        return transport(run, data, done)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Flower side (OMP_NUM_THREADS=1): the same kernels, the same bits
    try:
        runner.simulate(load_config(scenario), out, transport=diverging)
    finally:
        torch.set_num_threads(threads)
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    model = load_file(out / "model.safetensors")
    return record, {k: model[k].double().flatten().tolist() for k in sorted(model)}


def test_a_diverging_client_gets_the_same_outcome_in_the_simulator_a_daemon_and_flower(scenario, tmp_path,
                                                                                      run_flower):
    sim, sim_model = simulated(scenario, tmp_path / "sim", lambda run, data, done: nullcontext(
        runner.InProcessTransport(run.executor, data, done)))
    daemon, daemon_model = simulated(scenario, tmp_path / "grpc", grpc_transport)  # real ClientAgents, gRPC
    r = run_flower(["tests/flower_inproc.py", str(scenario), "--nan", str(BAD)], timeout=300)
    assert r.returncode == 0, r.stdout[-4000:]
    flower = json.loads(r.stdout.strip().splitlines()[-1])

    bad = sorted(sim["per_client"])[BAD]
    why = sim["per_client"][bad]["reason"]
    assert sim["per_client"][bad]["status"] == "rejected" and sim["rejected"] == {bad: why}
    assert why.startswith("client sent no update: local training diverged: tensor ") and "NaN or Inf" in why
    assert len(sim["clients"]) == 2 and bad not in sim["clients"]
    for other in (daemon, flower):  # who was asked, each one's status, reason and bytes each way; who counted
        assert other["per_client"] == sim["per_client"]
        assert other["rejected"] == sim["rejected"] and other["clients"] == sim["clients"]
    assert daemon_model == sim_model and flower["model"] == sim_model  # the others' updates, bit for bit
