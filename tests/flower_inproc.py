"""Run inside the Flower venv by tests/test_flower.py and tests/test_executor.py (flwr cannot share the project
venv; see benchmarks/flower_env.py). Drives FedadaptStrategy with an in-process Grid that hands each message to
the ClientApp of fedadapt.flower.app, and prints what the round recorded as JSON.

    python tests/flower_inproc.py SCENARIO.toml             tamper with some replies (the engine's checks)
    python tests/flower_inproc.py SCENARIO.toml --nan K     the K-th client's training diverges (NaN)
"""
from __future__ import annotations

import json
import sys

import torch
from flwr.app import Context, Message, RecordDict
from safetensors.torch import save

from fedadapt.core import codec
from fedadapt.flower import wire
from fedadapt.flower.app import load_run, make_client_app
from fedadapt.flower.strategy import FedadaptStrategy


class LocalGrid:
    """The two Grid calls the adapter makes, served by calling the ClientApp directly."""

    def __init__(self, app, n: int, tamper):
        self.app, self.nodes, self.tamper = app, {1000 + i: i for i in range(n)}, tamper

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            nid = m.metadata.dst_node_id
            ctx = Context(run_id=1, node_id=nid, node_config={"partition-id": self.nodes[nid]}, state=RecordDict(),
                          run_config={})
            reply = self.app(m, ctx)
            reply.metadata.__dict__["_src_node_id"] = nid  # a real grid stamps the sender
            out.append(self.tamper(m, reply))
        return out


def main(path: str, nan: int | None = None) -> None:
    from flwr.supercore.task_identity import TaskIdentity  # a ServerApp process has these set by Flower
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    run = load_run({}, path)
    ids = sorted(run.clients)
    fs = FedadaptStrategy(run.strategy, run.spec, num_rounds=1, min_nodes=len(ids), wait_for_nodes=1,
                          fraction_evaluate=0.0 if nan is not None else 0.5)
    if nan is not None:  # the same diverging client as the simulator and a daemon get (tests/test_executor.py)
        from nan_recipe import NaNFor

        run.executor.recipe = NaNFor(run.executor.recipe, run.clients[ids[nan]])
        grid = LocalGrid(make_client_app(path), len(ids), lambda msg, reply: reply)
        arrays, _ = fs.aggregate_train(1, grid.send_and_receive(list(fs.configure_train(1, None, None, grid))))
        rec = fs.records[-1]
        state = arrays.to_torch_state_dict()
        print(json.dumps({"per_client": rec.per_client, "rejected": rec.rejected, "clients": rec.clients,
                          "model": {k: state[k].double().flatten().tolist() for k in sorted(state)}}))
        return

    def re_upload(reply: Message, change) -> Message:
        r = wire.result_of(reply.content, "")
        tensors = codec.decode(r.payload)
        change(r, tensors)
        r.payload = save({k: v.contiguous() for k, v in tensors.items()})
        reply.content = wire.result_content(r)
        return reply

    def tamper(msg: Message, reply: Message) -> Message:
        if msg.metadata.message_type != "train":
            return reply
        cid = json.loads(msg.content.config_records[wire.META]["task"])["client_id"]
        name = lambda t: sorted(t)[0]  # noqa: E731
        if cid == ids[0]:  # a tensor of the wrong shape
            return re_upload(reply, lambda r, t: t.__setitem__(name(t), torch.zeros(3, 3)))
        if cid == ids[1]:  # one NaN
            return re_upload(reply, lambda r, t: t[name(t)].view(-1).__setitem__(0, float("nan")))
        if cid == ids[2]:  # a stale round
            return re_upload(reply, lambda r, t: setattr(r, "round", 7))
        if cid == ids[3]:  # claims another client's id: the server goes by node id, so still accepted as ids[3]
            return re_upload(reply, lambda r, t: setattr(r, "client_id", ids[4]))
        if cid == ids[4]:  # not readable at all
            reply.content.config_records[wire.META]["result"] = "{not json"
        return reply

    grid = LocalGrid(make_client_app(path), len(ids), tamper)
    msgs = list(fs.configure_train(1, None, None, grid))
    before = {k: v.clone() for k, v in fs.state.tensors.items()}
    arrays, metrics = fs.aggregate_train(1, grid.send_and_receive(msgs))
    rec = fs.records[-1]
    after = arrays.to_torch_state_dict()
    asks = list(fs.configure_evaluate(1, None, None, grid))  # federated evaluation of the new global adapter
    evaluated = fs.aggregate_evaluate(1, grid.send_and_receive(asks))
    print(json.dumps({"asked": sorted(rec.per_client), "accepted": rec.clients, "rejected": rec.rejected,
                      "ids": ids, "metrics": dict(metrics), "changed": any(not torch.equal(before[k], after[k])
                                                                          for k in before),
                      "evaluate_asked": len(asks), "evaluate": dict(evaluated or {})}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] == "--nan" else None)
