"""fedadapt tasks and results inside Flower messages, and back.

Tensors travel as the SAME safetensors bytes the coordinator and the simulator exchange, in one Flower
`Array` (stype "safetensors"), not as Flower's per-array numpy serialisation: the server then checks them
with the very `codec.decode(payload, contract=...)` the round engine applies to every upload, and the
bytes counted per round are the bytes a fedadapt deployment would move. Everything else (round, kind,
config, example count, metrics) rides as one JSON string, as on fedadapt's own wire (`config_json`):
exact for floats and 64-bit seeds, and free of ConfigRecord's type limits. A reply also carries a plain
MetricRecord ("num-examples" and the float metrics) for Flower tooling; the server does not read it.
"""

from __future__ import annotations

import json
import math
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedadapt.core.errors import PayloadError
from fedadapt.runtime.engine import ResultMessage, TaskMessage

ARRAYS = "arrays"  # the ArrayRecord holding the payload (Flower's conventional key)
PAYLOAD = "fedadapt.safetensors"  # the one Array in it
META = "fedadapt"  # the ConfigRecord holding the JSON
STYPE = "safetensors"


def payload_record(data: bytes) -> ArrayRecord:
    return ArrayRecord({PAYLOAD: Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=bytes(data))})


def _payload(content: RecordDict) -> bytes:
    try:
        arr = content.array_records[ARRAYS][PAYLOAD]
    except KeyError:
        raise PayloadError(f"message has no {ARRAYS}/{PAYLOAD} array") from None
    if arr.stype != STYPE:
        raise PayloadError(f"payload array has serialisation {arr.stype!r}, expected {STYPE!r}")
    return arr.data


def _meta(content: RecordDict, key: str) -> dict[str, Any]:
    try:
        meta = json.loads(content.config_records[META][key])
    except KeyError:
        raise PayloadError(f"message has no {META}/{key} record") from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise PayloadError(f"{META}/{key} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise PayloadError(f"{META}/{key} must be a JSON object")
    return meta


def task_content(msg: TaskMessage) -> RecordDict:
    meta = {"client_id": msg.client_id, "round": msg.round, "kind": msg.kind, "config": msg.config}
    return RecordDict({ARRAYS: payload_record(msg.payload), META: ConfigRecord({"task": json.dumps(meta)})})


def task_of(content: RecordDict) -> TaskMessage:
    m = _meta(content, "task")
    return TaskMessage(m["client_id"], m["round"], m["kind"], m["config"], _payload(content))


def result_content(r: ResultMessage) -> RecordDict:
    meta = {"client_id": r.client_id, "round": r.round, "num_examples": r.num_examples, "metrics": r.metrics}
    flat = {k: float(v) for k, v in r.metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return RecordDict({ARRAYS: payload_record(r.payload),
                       "metrics": MetricRecord({**flat, "num-examples": r.num_examples}),
                       META: ConfigRecord({"result": json.dumps(meta)})})


def result_of(content: RecordDict, client_id: str) -> ResultMessage:
    """A reply as the engine's ResultMessage. `client_id` is who the server addressed (from the node id
    Flower vouches for), never what the reply claims; the engine checks the rest (round, example count,
    metrics, payload contract)."""
    m = _meta(content, "result")
    metrics = m.get("metrics", {})
    return ResultMessage(client_id, m.get("round"), m.get("num_examples"), metrics if isinstance(metrics, dict) else {},
                         _payload(content))


def query_content(client_id: str, num_examples: int, capabilities: dict[str, Any]) -> RecordDict:
    info = {"client_id": client_id, "num_examples": num_examples, "capabilities": capabilities}
    return RecordDict({META: ConfigRecord({"client": json.dumps(info)})})


def client_of(content: RecordDict) -> dict[str, Any]:
    info = _meta(content, "client")
    if not isinstance(info.get("client_id"), str) or not info["client_id"]:
        raise PayloadError("query reply lacks a client_id")
    return info


def reply(content: RecordDict, to: Message) -> Message:
    return Message(content, reply_to=to)
