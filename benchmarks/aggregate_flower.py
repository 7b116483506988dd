"""The Flower side of aggregate_vs_flower.py: Flower 1.42's ``aggregate_arrayrecords`` on the same replies as
fedadapt's side (aggregate_common.py). That script runs it in benchmarks/.venv-flower:

    benchmarks/.venv-flower/bin/python benchmarks/aggregate_flower.py '{"threads": null, "repeats": 15, "warmup": 2}'

and reads the one JSON line it prints: the timings of every repeat (ms), the per-tensor sums of the result,
versions and the load.
"""
from __future__ import annotations

import json
import sys

from aggregate_common import EXAMPLES, NUM_REPLIES, interleaved, make_arrays, side_facts


def flower_side(threads: int | None, repeats: int, warmup: int) -> dict:
    import flwr
    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    if threads is not None:
        torch.set_num_threads(threads)
    records = []
    for k in range(NUM_REPLIES):
        arrays = make_arrays(k)
        ar = ArrayRecord({name: Array(t.numpy()) for name, t in arrays.items()})
        records.append(RecordDict({"arrays": ar, "metrics": MetricRecord({"num-examples": EXAMPLES[k]})}))
        del arrays

    def d():
        return aggregate_arrayrecords(records, "num-examples")

    def d_numpy():  # deserialise every Array once, dropping each result at once (as the aggregation does)
        n = 0
        for r in records:
            for ar in r.array_records.values():
                for v in ar.values():
                    n += v.numpy().size
        return n

    result = d()
    sums = {k: float(np.asarray(v.numpy(), dtype=np.float64).sum()) for k, v in result.items()}
    del result
    runs, cm = interleaved({"d": d, "d_numpy": d_numpy}, repeats, warmup)
    return {"runs_ms": runs, "result_sums": sums, "torch_threads": torch.get_num_threads(),
            "numpy": np.__version__, "flwr": flwr.__version__, "torch": torch.__version__, **side_facts(cm)}


if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    print(json.dumps(flower_side(cfg["threads"], cfg["repeats"], cfg["warmup"])))
