"""ClientApp: no training; reply with a float32 array of `reply-floats` values (numpy only, no torch)."""
from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    n = int(context.run_config.get("reply-floats", 1024))
    received = msg.content["arrays"]["w"].numpy()  # deserialise what came, as a real client would
    reply = np.empty(n, dtype=np.float32)
    reply.fill(float(received.flat[0]) if received.size else 0.0)
    content = RecordDict({
        "arrays": ArrayRecord({"w": Array(reply)}),
        "metrics": MetricRecord({"num-examples": 1}),
    })
    return Message(content=content, reply_to=msg)
