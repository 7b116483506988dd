"""Wall-clock and whole-process-tree memory measurement for benchmark commands.

Only dependency beyond the standard library: psutil.

    from measure import measure, median_of, summarize
    r = measure(["python", "-c", "print(1)"])
    # {'wall_s': 0.03, 'peak_rss_mb': 9.5, 'peak_pss_mb': 4.1, 'rc': 0, ...}

Memory is sampled every ``interval`` seconds (default 0.1 s). Each sample sums the
RSS and PSS over:

* the command's own process and all of its descendants, and
* every process whose command line satisfies ``match`` (a callable taking the
  argv list and returning bool) or whose environment contains ``match_env``
  (KEY, VALUE), plus all descendants of such a process.

The second set is what catches daemons that a command spawns detached from its
own tree (Flower's local SuperLink/SuperExec and the Ray processes under them).
The measuring process itself and its ancestors are never counted.

RSS double-counts pages shared between processes (e.g. the same ``libtorch``
mapped into several Python processes); PSS splits shared pages between the
processes that map them, so the PSS sum is the better "how much RAM does this
use" number. PSS comes from ``/proc/<pid>/smaps_rollup`` (what psutil's
``memory_full_info()`` reads); it is ``None`` when that is not permitted.

Cost matters on a 2-core box: going through psutil objects for ~80 processes and
their PSS took ~50 ms per sample under load (a third of a core at 0.1 s). So on
Linux each sample is one pass of raw reads over /proc (stat for ppid/RSS, cmdline,
environ only once per process); psutil is the fallback elsewhere. The time the
sampler itself spent is reported as ``sampler_busy_s``.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from typing import Callable, Iterable, Mapping, Sequence

import psutil

MB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
HAVE_PROC = os.path.exists(f"/proc/{os.getpid()}/stat")
HAVE_ROLLUP = os.path.exists(f"/proc/{os.getpid()}/smaps_rollup")

Matcher = Callable[[Sequence[str]], bool]


def _ancestors_and_self() -> set[int]:
    pids = {os.getpid()}
    try:
        for p in psutil.Process().parents():
            pids.add(p.pid)
    except psutil.Error:
        pass
    return pids


# ------------------------------------------------------------ raw /proc reads

def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _stat(pid: int) -> tuple[int, int, int, str, int] | None:
    """(ppid, starttime, rss_bytes, comm, cpu_ticks) from /proc/<pid>/stat."""
    data = _read(f"/proc/{pid}/stat")
    if not data:
        return None
    lpar, rpar = data.find(b"("), data.rfind(b")")
    f = data[rpar + 2:].split()
    # f[0] is field 3 (state): ppid = field 4, utime/stime = 14/15, starttime = 22, rss = 24
    return (int(f[1]), int(f[19]), int(f[21]) * PAGE, data[lpar + 1:rpar].decode(errors="replace"),
            int(f[11]) + int(f[12]))


def _cmdline(pid: int) -> list[str]:
    data = _read(f"/proc/{pid}/cmdline")
    if not data:
        return []
    parts = data.rstrip(b"\0").split(b"\0")
    if len(parts) == 1 and b" " in parts[0]:  # setproctitle-style rewritten argv
        parts = parts[0].split()
    return [p.decode(errors="replace") for p in parts]


def _environ_has(pid: int, key: str, value: str | None) -> bool:
    data = _read(f"/proc/{pid}/environ")
    if not data:
        return False
    k = key.encode() + b"="
    for item in data.split(b"\0"):
        if item.startswith(k):
            return value is None or item[len(k):] == value.encode()
    return False


def _pss(pid: int) -> int | None:
    """PSS in bytes; 0 for zombies/kernel threads (empty file); None if not permitted."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            data = f.read()
    except PermissionError:
        return None
    except FileNotFoundError:  # gone (or a kernel without smaps_rollup: then nothing works)
        return 0 if not os.path.exists(f"/proc/{pid}/stat") or HAVE_ROLLUP else None
    except OSError:  # ESRCH etc.: exiting, its memory is already released
        return 0
    i = data.find(b"\nPss:")
    if i < 0:
        return 0
    return int(data[i + 5:data.index(b"kB", i)]) * 1024


# ------------------------------------------------------------- process finder

def _safe_match(match: Matcher | None, cmdline: list[str]) -> bool:
    if match is None or not cmdline:
        return False
    try:
        return bool(match(cmdline))
    except Exception:  # a buggy matcher must not kill the sampler
        return False


class TreeCollector:
    """Finds the processes to measure with one pass over /proc per sample.

    ``collect(root_pid)`` returns ``{pid: (comm, rss_bytes)}`` for the root's tree
    plus every matched process and its tree. After each call ``cpu_ticks`` maps
    ``(pid, starttime) -> (utime+stime ticks, measured?)`` for EVERY process on the
    machine, so a caller can tell how busy the machine was besides the command.
    """

    def __init__(self, match: Matcher | None = None,
                 match_env: tuple[str, str | None] | None = None) -> None:
        self.match = match
        self.match_env = match_env
        self.skip = _ancestors_and_self()
        self._env_cache: dict[tuple[int, int], bool] = {}
        self._match_cache: dict[tuple[int, int], tuple[bool, int]] = {}
        self._n = 0
        self.cpu_ticks: dict[tuple[int, int], tuple[int, bool]] = {}

    RECHECK_EVERY = 10  # samples; a cmdline can change (exec, setproctitle), so re-test misses

    def _is_match(self, pid: int, starttime: int) -> bool:
        key = (pid, starttime)
        cached = self._match_cache.get(key)
        if cached is not None and (cached[0] or self._n - cached[1] < self.RECHECK_EVERY):
            return cached[0]  # a hit is sticky; a miss is re-tested now and then
        hit = _safe_match(self.match, _cmdline(pid))
        if not hit and self.match_env is not None:
            env_hit = self._env_cache.get(key)
            if env_hit is None:  # the environment is fixed after exec
                env_hit = self._env_cache[key] = _environ_has(pid, *self.match_env)
            hit = env_hit
        self._match_cache[key] = (hit, self._n)
        return hit

    def collect(self, root_pid: int | None) -> dict[int, tuple[str, int]]:
        if not HAVE_PROC:
            return self._collect_psutil(root_pid)
        self._n += 1
        want_match = self.match is not None or self.match_env is not None
        info: dict[int, tuple[str, int]] = {}
        children: dict[int, list[int]] = {}
        roots: list[int] = [] if root_pid is None else [root_pid]
        ticks: dict[int, tuple[int, int]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            st = _stat(pid)
            if st is None:
                continue
            ppid, starttime, rss, comm, cpu = st
            info[pid] = (comm, rss)
            ticks[pid] = (starttime, cpu)
            children.setdefault(ppid, []).append(pid)
            if want_match and pid not in self.skip and self._is_match(pid, starttime):
                roots.append(pid)
        out = self._walk(roots, info, children)
        self.cpu_ticks = {(pid, st): (cpu, pid in out) for pid, (st, cpu) in ticks.items()
                          if pid not in self.skip}
        return out

    def _walk(self, roots, info, children) -> dict[int, tuple[str, int]]:
        out: dict[int, tuple[str, int]] = {}
        stack = [r for r in roots if r in info]
        while stack:
            pid = stack.pop()
            if pid in out or pid in self.skip:
                continue
            out[pid] = info[pid]
            stack.extend(children.get(pid, ()))
        return out

    def _collect_psutil(self, root_pid):  # non-Linux fallback
        info, children = {}, {}
        roots = [] if root_pid is None else [root_pid]
        for p in psutil.process_iter(["ppid", "name", "memory_info", "cmdline"]):
            mi = p.info.get("memory_info")
            info[p.pid] = (p.info.get("name") or "?", mi.rss if mi else 0)
            children.setdefault(p.info.get("ppid"), []).append(p.pid)
            if p.pid not in self.skip and _safe_match(self.match, p.info.get("cmdline") or []):
                roots.append(p.pid)
        return self._walk(roots, info, children)


def matching_processes(
    match: Matcher | None = None,
    match_env: tuple[str, str | None] | None = None,
) -> list[psutil.Process]:
    """Live processes (not their descendants) whose cmdline satisfies ``match`` or
    whose environment has ``match_env = (KEY, VALUE)`` (VALUE None: any value).
    The calling process and its ancestors are excluded."""
    skip = _ancestors_and_self()
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if p.pid in skip:
            continue
        hit = _safe_match(match, p.info.get("cmdline") or [])
        if not hit and match_env is not None:
            try:
                env = p.environ()
                hit = match_env[0] in env and match_env[1] in (None, env[match_env[0]])
            except psutil.Error:
                hit = False
        if hit:
            out.append(p)
    return out


def collect_tree(root_pid: int | None, match: Matcher | None = None,
                 match_env: tuple[str, str | None] | None = None) -> dict[int, tuple[str, int]]:
    """{pid: (comm, rss_bytes)} for the root's tree plus matched processes and their trees."""
    return TreeCollector(match, match_env).collect(root_pid)


def _pss_any(pid: int) -> int | None:
    if HAVE_PROC:
        return _pss(pid)
    try:
        return getattr(psutil.Process(pid).memory_full_info(), "pss", None)
    except psutil.NoSuchProcess:
        return 0
    except psutil.Error:
        return None


def sample_memory(procs: Mapping[int, tuple[str, int]], want_pss: bool = True
                  ) -> tuple[int, int | None, dict]:
    """(rss_bytes, pss_bytes_or_None, {pid: (comm, rss, pss)}) summed over ``procs``.

    The PSS sum is None when not wanted or when any process's PSS could not be read
    (not permitted): an incomplete sum would understate the peak."""
    rss_total, pss_total, pss_ok = 0, 0, want_pss
    detail = {}
    for pid, (comm, rss) in procs.items():
        pss = _pss_any(pid) if want_pss else None
        if pss is None:
            pss_ok = False
        rss_total += rss
        pss_total += pss or 0
        detail[pid] = (comm, rss, pss)
    return rss_total, (pss_total if pss_ok else None), detail


# -------------------------------------------------------------------- measure

def measure(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    match: Matcher | None = None,
    *,
    match_env: tuple[str, str | None] | None = None,
    cwd: str | None = None,
    interval: float = 0.1,
    pss_interval: float | None = 0.5,
    timeout: float | None = None,
    stdout=None,
    stderr=None,
    want_pss: bool = True,
) -> dict:
    """Run ``cmd`` and measure wall time and peak summed RSS/PSS of its processes.

    ``env`` replaces the environment (pass ``{**os.environ, ...}`` to extend it).
    ``match`` (argv -> bool) adds processes outside the command's tree, e.g.
    detached daemons; ``match_env=(KEY, VALUE)`` adds every process whose
    environment has KEY=VALUE (tag the command's env with a unique value to catch
    everything it spawns, detached or not). Descendants of matched processes are
    included. ``stdout``/``stderr`` go to ``subprocess.Popen`` (default: inherited).

    RSS is sampled every ``interval`` s. PSS costs far more (the kernel walks every
    page table: ~20-30 ms of CPU per sample for a 1.6 GB process set, i.e. a
    quarter of a core at 0.1 s on a 2-core box), so it is read at most every
    ``pss_interval`` s, plus at any sample that sets a new RSS peak (but not more
    often than every 2 x ``interval``; "new" = 2 % above the previous peak). ``pss_interval=None`` (or <= interval):
    PSS at every sample.

    Returns ``dict(wall_s, peak_rss_mb, peak_pss_mb, rc, timed_out, samples,
    pss_samples, pss_failed_samples, sampler_busy_s, sampler_cpu_s, cpu_s, background_cpu_s, background_cores,
    peak_procs)``: ``sampler_*`` is the time the sampler itself spent (its
    perturbation); ``cpu_s`` is the CPU time of the measured processes and
    ``background_cpu_s`` that of every OTHER process on the machine during the run
    (both approximate: CPU used in the last interval of a process that exits is
    missed), ``background_cores`` = background_cpu_s / wall_s: anything well above
    0 means the machine was not quiet and the wall time is inflated; ``peak_procs`` lists
    ``(pid, comm, rss_mb, pss_mb)`` at the sample with the highest RSS sum (pss_mb
    is None there unless PSS was read in that sample), ``peak_pss_procs`` the same
    at the sample with the highest PSS sum.
    """
    state = {"peak_rss": 0, "peak_pss": None, "samples": 0, "pss_samples": 0, "pss_failed": 0,
             "peak_detail": {}, "peak_pss_detail": {}, "busy": 0.0, "sampler_cpu": 0.0, "cpu_ticks": 0, "bg_ticks": 0}
    pss_every = interval if pss_interval is None else max(pss_interval, interval)
    stop = threading.Event()
    collector = TreeCollector(match, match_env)

    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, cwd=cwd,
                            stdout=stdout, stderr=stderr)

    def sampler() -> None:
        prev: dict | None = None
        last_pss = -1e9
        while True:
            ts, tc = time.perf_counter(), time.thread_time()
            procs = collector.collect(proc.pid)
            cur = collector.cpu_ticks
            if prev is not None:  # CPU used since the last sample, ours vs everybody else's
                for key, (ticks, measured) in cur.items():
                    d = ticks - prev.get(key, (0, False))[0]
                    state["cpu_ticks" if measured else "bg_ticks"] += max(d, 0)
            prev = cur
            rss = sum(r for _, r in procs.values())
            since = ts - last_pss
            do_pss = want_pss and (since >= pss_every - 1e-3 or
                                   (rss > 1.02 * state["peak_rss"] and since >= 2 * interval - 1e-3))
            rss, pss, detail = sample_memory(procs, want_pss=do_pss)
            state["samples"] += 1
            if do_pss:
                last_pss = ts
                state["pss_samples"] += 1
                if pss is None:
                    state["pss_failed"] += 1
                elif pss > (state["peak_pss"] or 0):
                    state["peak_pss"] = pss
                    state["peak_pss_detail"] = detail
            if rss > state["peak_rss"]:
                state["peak_rss"] = rss
                state["peak_detail"] = detail
            busy = time.perf_counter() - ts
            state["busy"] += busy
            state["sampler_cpu"] += time.thread_time() - tc
            if stop.wait(max(0.0, interval - busy)):
                return

    th = threading.Thread(target=sampler, name="mem-sampler", daemon=True)
    th.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            victims = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
        except psutil.Error:
            victims = []
        for p in victims:
            try:
                p.kill()
            except psutil.Error:
                pass
        rc = proc.wait()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()

    def table(detail: dict, col: int) -> list:
        rows = [(pid, comm, round(rss / MB, 1), None if pss is None else round(pss / MB, 1))
                for pid, (comm, rss, pss) in detail.items()]
        return sorted(rows, key=lambda t: -(t[col] or 0))

    return {
        "wall_s": round(wall, 3),
        "peak_rss_mb": round(state["peak_rss"] / MB, 1),
        "peak_pss_mb": None if state["peak_pss"] is None else round(state["peak_pss"] / MB, 1),
        "rc": rc,
        "timed_out": timed_out,
        "samples": state["samples"],
        "pss_samples": state["pss_samples"],
        "pss_failed_samples": state["pss_failed"],
        "sampler_busy_s": round(state["busy"], 3),
        "sampler_cpu_s": round(state["sampler_cpu"], 3),
        "cpu_s": round(state["cpu_ticks"] / CLK_TCK, 2),
        "background_cpu_s": round(state["bg_ticks"] / CLK_TCK, 2),
        "background_cores": round(state["bg_ticks"] / CLK_TCK / wall, 3) if wall > 0 else None,
        "peak_procs": table(state["peak_detail"], 2),
        "peak_pss_procs": table(state["peak_pss_detail"], 3),
    }


# ----------------------------------------------------------------- statistics

def median_of(n: int, fn: Callable[[], dict], key: str = "wall_s") -> tuple[float, list[dict]]:
    """Call ``fn`` ``n`` times; return (median of ``result[key]``, all results)."""
    runs = [fn() for _ in range(n)]
    return statistics.median(r[key] for r in runs), runs


def summarize(runs: Sequence[dict], keys: Iterable[str] = ("wall_s", "peak_rss_mb", "peak_pss_mb")
              ) -> dict:
    """{key: {median, min, max, n}} over the runs, ignoring ``None`` values."""
    out = {}
    for k in keys:
        vals = [r[k] for r in runs if r.get(k) is not None]
        if vals:
            out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                      "n": len(vals)}
        else:
            out[k] = {"median": None, "min": None, "max": None, "n": 0}
    return out


if __name__ == "__main__":  # self-check: python benchmarks/measure.py
    import sys

    r = measure([sys.executable, "-c", "import time; b = bytearray(200 * 2**20); time.sleep(0.5)"])
    print({k: v for k, v in r.items() if k != "peak_procs"})
    assert r["rc"] == 0 and r["peak_rss_mb"] > 190 and r["peak_pss_mb"] > 190, r
    # a detached grandchild found through match_env
    tag = ("MEASURE_SELFTEST", str(os.getpid()))
    inner = ("import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
             "'import time; b = bytearray(300 * 2**20); time.sleep(1.5)'], start_new_session=True)")
    # the middle process exits at once, so the grandchild is reparented (not in our tree)
    code = (f"import subprocess, sys, time; subprocess.run([sys.executable, '-c', {inner!r}]); "
            "time.sleep(1.0)")
    r = measure([sys.executable, "-c", code],
                env={**os.environ, tag[0]: tag[1]}, match_env=tag)
    print({k: v for k, v in r.items() if k != "peak_procs"})
    assert r["peak_rss_mb"] > 290, r
    time.sleep(1.0)
    print("ok")
