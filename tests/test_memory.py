"""fedadapt.core.memory: daemons keep freed payload memory for the next payload instead of faulting fresh
pages in every round. Measured in a child process (the setting is process-wide) by its minor page faults."""

from __future__ import annotations

import subprocess
import sys

CHILD = r"""
import resource, sys
from fedadapt.core.memory import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
size = 64 * 2**20
buf = bytearray(size); del buf  # the first payload: its pages are faulted in once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
buf = bytearray(size)  # the next payload of the same size
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True, timeout=60)
    return int(out.stdout)


def test_the_second_payload_reuses_the_pages_of_the_first():
    fresh, reused = faults("default"), faults("reuse")  # by default glibc maps a large buffer afresh
    assert fresh > 0 and reused * 10 < fresh, (fresh, reused)
    assert reused < 64 * 2**20 // 4096 // 20  # well under one fault per 4 KiB page
