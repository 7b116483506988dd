"""Process-wide memory tuning for the long-running daemons (coordinator and client agents)."""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def reuse_freed_memory() -> bool:
    """Serve large allocations from the heap and keep freed memory there for the next one (glibc only).

    A daemon allocates and frees payload buffers of up to hundreds of MiB every round. By default glibc maps
    each large buffer afresh and unmaps it on free, so every page is faulted in again next round; on a VM
    that costs more than copying the bytes (a 100 MiB join: 80 ms faulting versus 10 ms reusing). The price
    is that the process keeps its peak footprint instead of returning it to the system between rounds.
    Returns False where the C library is not glibc (nothing changes there).
    """
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        libc.gnu_get_libc_version  # only glibc has it, and the parameters below are glibc's
    except (OSError, AttributeError):
        return False
    # One arena: a thread's own arena is capped at 64 MiB, so its large buffers would be mapped afresh anyway.
    return all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
