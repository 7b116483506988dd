"""ClientApp: load global weights, do `local-steps` SGD steps on local data, send weights back."""
from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowerbench.task import client_data, make_model, train_steps

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    rc = context.run_config
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    pid = int(context.node_config.get("partition-id", 0))
    n = int(rc.get("samples-per-client", 64))
    x, y = client_data(pid, n, int(rc.get("seed", 0)))
    lr = float(msg.content["config"].get("lr", rc.get("lr", 0.05)))
    loss = train_steps(model, x, y, lr, int(rc.get("local-steps", 1)))
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"train_loss": loss, "num-examples": n}),
    })
    return Message(content=content, reply_to=msg)
