"""What every benchmark script shares: where things are, the facts of the machine a result was measured on,
writing a result file atomically, how busy the machine is, logging, ending the processes a run started, and
running `fedadapt simulate`. Timing and memory sampling of commands are in measure.py; the Flower venv and the
environment of Flower's processes are in flower_env.py.

    from harness import REPO, machine_facts, write_json

Only the standard library is needed to import it (psutil where a function says so), so that it also serves
the Flower venv's side of a benchmark.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
PROJECT_PYTHON = REPO / ".venv" / "bin" / "python"
FEDADAPT_CLI = Path(sys.executable).parent / "fedadapt"  # the CLI of the venv running the benchmark
# A run of a 2.4k-parameter MLP on synthetic data, every client every round: the coordinator benchmarks' workload
# (their clients echo the global tensors back; evaluation effectively off)
ECHO_RUN_TOML = """
name = "{name}"
seed = 0
rounds = {rounds}
clients_per_round = {clients}
[model]
source = "mlp"
hidden = [64]
[adapter]
kind = "full"
[data]
dataset = "synthetic"
partition = "iid"
num_clients = {clients}
num_examples = {examples}
[train]
lr = 0.05
local_steps = 1
batch_size = 8
[eval]
every = 100000
max_examples = 8
[coordinator]
min_clients = {clients}
"""


def log(msg: str) -> None:
    """A progress line on stderr (stdout is for the result)."""
    print(msg, file=sys.stderr, flush=True)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def command_line(python: str | None = None) -> str:
    """The command that is running, quoted for a shell; `python` replaces the interpreter's path in it."""
    return " ".join(shlex.quote(a) for a in [python or sys.executable, *sys.argv])


# ------------------------------------------------------------------------------------------ machine

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        return ""


def mem_total_gb() -> float | None:
    """Total memory in GiB (psutil, else /proc/meminfo); None when neither can say."""
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            kb = next((int(ln.split()[1]) for ln in f if ln.startswith("MemTotal:")), None)
    except OSError:
        return None
    return None if kb is None else round(kb / 2**20, 1)


def sys_value(path: str | Path) -> str | None:
    """The stripped text of a /proc or /sys file, None where it does not exist."""
    path = Path(path)
    return path.read_text().strip() if path.exists() else None


def python_facts(python: Path | str, modules: list[str]) -> dict:
    """Python and module versions of another interpreter (a venv); {"error": ...} when it cannot say."""
    code = ("import importlib, json, sys\n"
            "d = {'python': sys.version.split()[0]}\n"
            f"for m in {modules!r}:\n"
            "    try:\n"
            "        d[m] = importlib.import_module(m).__version__\n"
            "    except Exception:\n"
            "        d[m] = None\n"
            "print(json.dumps(d))\n")
    try:
        r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
        return json.loads(r.stdout)
    except Exception as e:  # noqa: BLE001 - a fact we could not read is reported, not fatal
        return {"error": repr(e)}


def machine_facts(**venvs: tuple[Path | str, list[str]]) -> dict:
    """Host, cores, CPU, memory, kernel and this interpreter's versions; each keyword names a venv's python
    and the modules whose versions to record, e.g. machine_facts(flower_venv=(py, ["flwr", "ray"]))."""
    facts = {
        "hostname": socket.gethostname(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "runner_python": sys.version.split()[0],
    }
    mem = mem_total_gb()
    if mem is not None:
        facts["mem_total_gb"] = mem
    for name, (python, modules) in venvs.items():
        facts[name] = python_facts(python, modules)
    return facts


# --------------------------------------------------------------------------------------- the results

def write_json(path: Path, data: dict, *, indent: int = 2) -> None:
    """Write `data` as indented JSON through a temporary file, so a reader never sees half a result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=str) + "\n")
    os.replace(tmp, path)


def add_json_args(ap, default: Path, report: str) -> None:
    """--json PATH (the result file) and --report (print `report` of an earlier run's --json, run nothing)."""
    ap.add_argument("--json", type=Path, default=default)
    ap.add_argument("--report", action="store_true", help=f"only print {report} of an earlier run's --json")


def print_report(path: Path, render: Callable[[dict], str], also: dict[str, str] | None = None) -> int:
    """What --report prints: which run the result file `path` holds ("Run of <started_utc>: `<command>`", then
    ", <label> <value>" for each label: key of `also`) and `render(data)`, its tables. Returns 0, the exit status."""
    data = json.loads(Path(path).read_text())
    extra = "".join(f", {label} {data[key]}" for label, key in (also or {}).items())
    print(f"Run of {data['started_utc']}: `{data['command']}`{extra}\n")
    print(render(data))
    return 0


def record_problems(res: dict, problems: list[str], label: str, log_path: Path) -> dict:
    """Set res["ok"] and res["problems"]; on a failure log the problems and the tail of the run's log."""
    res["ok"] = not problems
    res["problems"] = problems
    if problems:
        tail = Path(log_path).read_text(errors="replace")[-3000:]
        log(f"[{label}] run FAILED: {problems}\n--- tail of {log_path} ---\n{tail}")
    return res


# -------------------------------------------------------------------------------------- machine load

def _cpu_seconds() -> tuple[float, float]:
    """(all, idle incl. iowait) CPU seconds of the whole machine since boot: /proc/stat, else psutil, else 0."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        return sum(v) / tick, (v[3] + (v[4] if len(v) > 4 else 0)) / tick
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return 0.0, 0.0
    t = psutil.cpu_times()
    return sum(t), t.idle + getattr(t, "iowait", 0)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot."""
    total, idle = _cpu_seconds()
    return total - idle


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of the children it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def busy_cores(period: float = 1.0) -> float:
    """How many cores the whole machine kept busy over ``period`` seconds (nothing of ours runs meanwhile)."""
    t0, i0 = _cpu_seconds()
    time.sleep(period)
    t1, i1 = _cpu_seconds()
    n = os.cpu_count() or 1
    return max(0.0, round(n * (1 - (i1 - i0) / (t1 - t0)), 2)) if t1 > t0 else 0.0


class Quiet(NamedTuple):
    busy_cores: float  # when the wait ended
    waited_s: float
    loadavg_1m: float


def wait_for_quiet(label: str, max_wait: float, threshold: float) -> Quiet:
    """Wait (up to ``max_wait`` s) until fewer than ``threshold`` cores are busy, so other work does not inflate
    the timings; measuring goes on regardless, with a warning."""
    t0 = time.monotonic()
    busy = busy_cores()
    warned = False
    while busy > threshold and time.monotonic() - t0 < max_wait:
        if not warned:
            log(f"[{label}] machine busy ({busy} cores used by other processes); "
                f"waiting up to {max_wait:.0f}s for it to go quiet ...")
            warned = True
        time.sleep(2)
        busy = busy_cores()
    if busy > threshold:
        log(f"[{label}] WARNING: still {busy} cores busy; measuring anyway (timings will be inflated)")
    return Quiet(busy, round(time.monotonic() - t0, 1), os.getloadavg()[0])


class CpuMeter:
    """CPU used by OTHER processes over a stretch of wall time: the machine's busy time minus this process's own
    CPU time (and that of the children it waited for). ``with CpuMeter() as cm: ...`` or start()/stop(); then
    ``wall``, ``own`` and ``other`` (seconds) and ``background_cores`` = other / wall."""

    def start(self) -> CpuMeter:
        self.b0, self.o0, self.w0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        return self

    def stop(self) -> CpuMeter:
        self.wall = time.perf_counter() - self.w0
        self.own = own_cpu_seconds() - self.o0
        self.other = max(0.0, (busy_cpu_seconds() - self.b0) - self.own)
        self.background_cores = round(self.other / self.wall, 3) if self.wall > 0 else None
        return self

    def __enter__(self) -> CpuMeter:
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False


# ----------------------------------------------------------------------------------------- processes

def kill_processes(procs: Iterable, grace: float = 5.0) -> list[str]:
    """SIGTERM each psutil.Process and its descendants (by PID; never this process), SIGKILL what is left after
    ``grace`` s. Returns "pid: cmdline" of each process signalled. Needs psutil."""
    import psutil

    victims: dict[int, psutil.Process] = {}
    for p in procs:
        try:
            tree = [p, *p.children(recursive=True)]
        except psutil.Error:
            tree = [p]
        for q in tree:
            if q.pid != os.getpid():
                victims.setdefault(q.pid, q)
    desc = []
    for q in victims.values():
        try:
            cmdline = q.cmdline()
        except psutil.Error:
            cmdline = []
        desc.append(f"{q.pid}: {' '.join(cmdline)[:120]}")
        try:
            q.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(victims.values()), timeout=grace)
    for q in alive:  # e.g. ray::DashboardAgent ignores SIGTERM (Flower notes P4)
        try:
            q.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return desc


# ---------------------------------------------------------------------------------- fedadapt simulate

def simulate_cmd(scenario: Path | str, out: Path | str, overrides: Iterable[str] = ()) -> list[str]:
    """`fedadapt simulate SCENARIO --out OUT --set OVERRIDE ...` with the CLI of the venv running the benchmark."""
    return [str(FEDADAPT_CLI), "simulate", str(scenario), "--out", str(out),
            *[a for o in overrides for a in ("--set", o)]]


def measure_simulate(scenario: Path | str, out: Path | str, overrides: Iterable[str] = (),
                     failed: str = "failed") -> dict:
    """Run simulate_cmd from the repository root under measure.measure (its output discarded) and return the
    measurement; a failed run ends the benchmark with "<failed> (exit RC): <command>"."""
    from measure import measure

    cmd = simulate_cmd(scenario, out, overrides)
    m = measure(cmd, env={**os.environ}, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if m["rc"] != 0:
        sys.exit(f"{failed} (exit {m['rc']}): {' '.join(cmd)}")
    return m
