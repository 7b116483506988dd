"""ServerApp: plain FedAvg for `num-server-rounds`; writes the final model to `out-path`.

Next to the model it writes `<out-path>.json` with the number of train replies
aggregated in each round, so the benchmark can verify that every client took
part in every round.
"""
from __future__ import annotations

import json
import os
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flowerbench.task import make_model

app = ServerApp()


class CountingFedAvg(FedAvg):
    """FedAvg that records how many replies it aggregated per round."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replies_per_round: dict[int, int] = {}

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.replies_per_round[server_round] = sum(1 for m in replies if not m.has_error())
        return super().aggregate_train(server_round, replies)


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    num_rounds = int(rc.get("num-server-rounds", 5))
    num_clients = int(rc.get("num-clients", 10))
    t0 = time.perf_counter()

    model = make_model(int(rc.get("seed", 0)))
    strategy = CountingFedAvg(
        fraction_train=float(rc.get("fraction-train", 1.0)),
        fraction_evaluate=0.0,
        # wait for all nodes before round 1 (first-round sampling race otherwise)
        min_train_nodes=num_clients,
        min_available_nodes=num_clients,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        train_config=ConfigRecord({"lr": float(rc.get("lr", 0.05))}),
        num_rounds=num_rounds,
    )

    out_path = str(rc.get("out-path", "") or "")
    if out_path:
        if not os.path.isabs(out_path):
            raise ValueError(f"out-path must be absolute, got {out_path!r}")
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        torch.save(result.arrays.to_torch_state_dict(), out_path)
        with open(out_path + ".json", "w") as f:
            json.dump({
                "num_rounds": num_rounds,
                "num_clients": num_clients,
                "replies_per_round": strategy.replies_per_round,
                "serverapp_main_s": round(time.perf_counter() - t0, 3),
                "num_params": sum(p.numel() for p in model.parameters()),
            }, f)
