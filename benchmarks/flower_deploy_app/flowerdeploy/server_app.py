"""ServerApp: stock FedAvg (all nodes sampled) with a timestamp per round event.

Appends JSON lines to the absolute path `stamps-path` (flushed at once, so a failed run still
leaves what it reached):

  {"event": "nodes_ready", "t": ..., "nodes": N}           all `num-nodes` SuperNodes connected
  {"event": "round_start", "round": r, "t": ...}           FedAvg.configure_train entered
  {"event": "replies_in", "round": r, "t": ..., "replies": k, "errors": e, "reply_bytes": b}
  {"event": "round_end", "round": r, "t": ...}             aggregate_train returned
  {"event": "done", "t": ..., "replies_per_round": {...}}

`t` is time.time() (wall clock, comparable across processes on one host).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class Stamps:
    def __init__(self, path: str) -> None:
        if path and not os.path.isabs(path):
            raise ValueError(f"stamps-path must be absolute, got {path!r}")
        self.path = path

    def write(self, **rec) -> None:
        if not self.path:
            return
        rec.setdefault("t", time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()


class FastPollGrid:
    """Grid proxy whose send_and_receive pulls every `interval` s instead of every 3 s."""

    def __init__(self, grid: Grid, interval: float) -> None:
        self._grid, self._interval = grid, interval

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        ids = set(self._grid.push_messages(messages))
        end = time.time() + (timeout or 0.0)
        out = []
        while timeout is None or time.time() < end:
            got = list(self._grid.pull_messages(ids))
            out.extend(got)
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if not ids:
                break
            time.sleep(self._interval)
        return out


class StampedFedAvg(FedAvg):
    def __init__(self, stamps: Stamps, keep_global: ArrayRecord | None, **kw) -> None:
        super().__init__(**kw)
        self.stamps, self.keep_global = stamps, keep_global
        self.replies_per_round: dict[int, int] = {}

    def configure_train(self, server_round, arrays, config, grid):
        self.stamps.write(event="round_start", round=server_round)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        nbytes = sum(len(a.data) for m in ok for ar in m.content.array_records.values() for a in ar.values())
        self.replies_per_round[server_round] = len(ok)
        self.stamps.write(event="replies_in", round=server_round, replies=len(ok),
                          errors=len(replies) - len(ok), reply_bytes=nbytes)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if self.keep_global is not None and arrays is not None:
            arrays = self.keep_global  # upload-only rounds: the broadcast stays small
        self.stamps.write(event="round_end", round=server_round)
        return arrays, metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    stamps = Stamps(str(rc.get("stamps-path", "") or ""))
    num_nodes = int(rc.get("num-nodes", 2))
    rounds = int(rc.get("num-server-rounds", 5))
    poll = float(rc.get("poll-interval", 0.0))

    t0 = time.time()
    deadline = t0 + float(rc.get("node-wait-timeout", 600.0))
    while len(list(grid.get_node_ids())) < num_nodes:
        if time.time() > deadline:
            stamps.write(event="error", reason=f"fewer than {num_nodes} nodes after timeout")
            raise RuntimeError(f"only {len(list(grid.get_node_ids()))} of {num_nodes} nodes connected")
        time.sleep(0.2)
    stamps.write(event="nodes_ready", nodes=len(list(grid.get_node_ids())), waited_s=time.time() - t0)

    initial = ArrayRecord({"w": Array(np.full(int(rc.get("global-floats", 1024)), 0.5, dtype=np.float32))})
    strategy = StampedFedAvg(
        stamps, initial if bool(rc.get("keep-global", False)) else None,
        fraction_train=1.0, fraction_evaluate=0.0,
        min_train_nodes=num_nodes, min_available_nodes=num_nodes,  # P6: no first-round race
    )
    strategy.start(grid=grid if poll <= 0 else FastPollGrid(grid, poll), initial_arrays=initial,
                   train_config=ConfigRecord({"lr": 0.0}), num_rounds=rounds)
    stamps.write(event="done", replies_per_round=strategy.replies_per_round)
