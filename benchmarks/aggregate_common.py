"""What both sides of aggregate_vs_flower.py share: the setup, the replies and the timing loop.

Imported by aggregate_vs_flower.py (fedadapt's side, in the project venv) and by aggregate_flower.py (Flower's
side, in benchmarks/.venv-flower), so that both time bit-identical arrays the same way. Needs torch and
harness.py only.
"""
from __future__ import annotations

import gc
import os
import random
import time
from typing import Callable

from harness import CpuMeter

NUM_REPLIES = 10
NUM_TENSORS = 20
SHAPE = (500, 1000)
SEED = 1234
EXAMPLES = [100 + 7 * k for k in range(NUM_REPLIES)]


def make_arrays(k: int) -> dict:
    """Reply k's tensors: bit-identical in both venvs (same torch, same generator)."""
    import torch

    g = torch.Generator().manual_seed(SEED + k)
    return {f"layer{j:02d}.weight": torch.randn(*SHAPE, generator=g) for j in range(NUM_TENSORS)}


def timed(fn: Callable[[], object]) -> float:
    """Milliseconds one call of ``fn`` takes, after a garbage collection; its result is dropped."""
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    del out
    return dt * 1e3


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int
                ) -> tuple[dict[str, list[float]], CpuMeter]:
    """Every function timed once per repeat, in a shuffled order, so that background load hits all of them
    alike; the first ``warmup`` repeats are not recorded. Returns ({name: [ms per repeat]}, the CPU meter over
    all of it)."""
    runs: dict[str, list[float]] = {k: [] for k in fns}
    rng = random.Random(0)
    with CpuMeter() as cm:
        for i in range(warmup + repeats):
            order = list(fns.items())
            rng.shuffle(order)
            for name, fn in order:
                ms = timed(fn)
                if i >= warmup:
                    runs[name].append(ms)
    return runs, cm


def side_facts(cm: CpuMeter) -> dict:
    """The load during one side's measurements (``interleaved``'s meter) and right after it."""
    return {"background_cores": cm.background_cores, "side_wall_s": round(cm.wall, 1),
            "side_cpu_s": round(cm.own, 1), "loadavg_1m_after": round(os.getloadavg()[0], 2)}
