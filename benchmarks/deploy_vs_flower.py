#!/usr/bin/env python3
"""Deployment runtime on loopback: Flower 1.42 (SuperLink + N SuperNodes), with a slot for fedadapt.

Two measurements, each the same trivial workload fedadapt's coordinator will run:

* **per-round overhead**: a numpy-only echo ClientApp (no torch) that returns 1024 float32
  values; stock FedAvg samples all N SuperNodes every round; R rounds. The ServerApp appends a
  timestamp per round event to an absolute path (benchmarks/flower_deploy_app), so per-round
  time = (wall of the rounds) / R, and the per-round median comes from the same stamps.
* **upload throughput**: 2 SuperNodes whose ClientApp returns 100 MiB of float32 each; the
  global model stays 4 KiB (keep-global), so only the upload grows. Effective MB/s =
  (2 x 100 MiB) / (median round time with 100 MiB replies - median round time with 1024-float
  replies), both runs with 2 nodes and the same pull interval.

Deployment (shared/docs/FLOWER-NOTES.md section 3, pitfalls P1-P5): ``flower-superlink --insecure
--disable-runtime-dependency-installation`` on a free port of 127.0.0.1 with the in-memory state,
N ``flower-supernode --insecure`` processes with distinct ``--port`` values, a fresh FLWR_HOME per
run whose config.toml defines the ``deploy`` connection, FLWR_DISABLE_UPDATE_CHECK=1,
FLWR_TELEMETRY_ENABLED=0, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1. ``flwr run <app> deploy
--stream`` is what is measured (benchmarks/measure.py: wall, peak RSS/PSS summed over every
process carrying this run's env tag: SuperLink, its SuperExec, ServerApp, SuperNodes, their
SuperExecs and the per-message ClientApp processes). A run counts as OK only if ``flwr run``
exited 0, ``flwr ls --format json`` says ``finished:completed`` (P5: ``--stream`` exits 0 on
failure), every round got N replies without errors, and nothing was left running afterwards.
Every process started is killed by PID (its whole tree, plus anything with the env tag), also on
failure or Ctrl-C. A memory guard kills the deployment if MemAvailable drops below
``--min-free-gb`` (the machine is shared), and the run is recorded as infeasible with the reason.

Pull interval: Flower's ``Grid.send_and_receive`` sleeps a fixed 3 s between pulls. ``--poll
stock`` uses it as shipped; a number (e.g. 0.05) wraps the Grid in a 0.05 s pull loop (the
notes' tuning). The upload measurement defaults to 0.05 s, because 3 s pulls would quantise the
round-time difference it is computed from.

Usage (from the repository root, project venv; Flower runs from benchmarks/.venv-flower):

    .venv/bin/python benchmarks/deploy_vs_flower.py                       # everything, defaults
    .venv/bin/python benchmarks/deploy_vs_flower.py --nodes 2,10,50 --flower-nodes 2,10 --rounds 5
    .venv/bin/python benchmarks/deploy_vs_flower.py --only upload --upload-mib 100
    .venv/bin/python benchmarks/deploy_vs_flower.py --skip-flower         # fedadapt side only
    .venv/bin/python benchmarks/deploy_vs_flower.py --report              # the tables of the last run

Writes benchmarks/results/deploy_flower.json (atomically): raw runs, per-round stamps, medians,
peak RSS/PSS, the load, and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from flower_env import FLOWER_VENV, flower_bin, flower_process_env, flwr_ls  # noqa: E402
from harness import BENCH_DIR, PROJECT_PYTHON, REPO, RESULTS, add_json_args, kill_processes, print_report  # noqa: E402
from measure import TreeCollector, matching_processes, measure, sample_memory  # noqa: E402

FLOWER_APP = BENCH_DIR / "flower_deploy_app"
RESULTS_JSON = RESULTS / "deploy_flower.json"
TAG_KEY = "FEDADAPT_DEPLOY_BENCH_TAG"
MIB = 1024 * 1024
TINY_FLOATS = 1024


def log(msg: str) -> None:
    harness.log(f"[{time.strftime('%H:%M:%S')}] {msg}")


def _bin(name: str) -> str:
    return str(flower_bin(name))


# ------------------------------------------------------------------ processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries TAG_KEY=tag (not this process or its parents)."""
    return matching_processes(match_env=(TAG_KEY, tag))


class MemoryGuard(threading.Thread):
    """Calls ``on_low()`` once if MemAvailable falls below ``min_free`` bytes."""

    def __init__(self, min_free: float, on_low) -> None:
        super().__init__(daemon=True, name="mem-guard")
        self.min_free, self.on_low = min_free, on_low
        self.tripped: str | None = None
        self.min_seen = float("inf")
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(0.5):
            avail = psutil.virtual_memory().available
            self.min_seen = min(self.min_seen, avail)
            if avail < self.min_free:
                self.tripped = (f"MemAvailable fell to {avail / 2**30:.1f} GiB (< {self.min_free / 2**30:.1f} "
                                "GiB guard): deployment killed")
                log(f"[guard] {self.tripped}")
                self.on_low()
                return

    def stop(self) -> None:
        self._stop.set()


class FlowerDeployment:
    """SuperLink + N SuperNodes on 127.0.0.1, every process tagged and killed by PID on exit."""

    def __init__(self, work: Path, nodes: int, tag: str, start_timeout: float = 600.0) -> None:
        self.work, self.nodes, self.tag, self.start_timeout = work, nodes, tag, start_timeout
        self.env = flower_process_env(work / "flwr_home", PYTHONUNBUFFERED="1", **{TAG_KEY: tag})
        self.link_port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.logs: list = []
        (work / "logs").mkdir(parents=True, exist_ok=True)
        home = work / "flwr_home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "deploy"\n\n'
            f'[superlink.deploy]\naddress = "127.0.0.1:{self.link_port}"\ninsecure = true\n')

    def _spawn(self, cmd: list[str], name: str) -> subprocess.Popen:
        f = open(self.work / "logs" / f"{name}.log", "wb")
        self.logs.append(f)
        p = subprocess.Popen(cmd, env=self.env, cwd=str(self.work), stdout=f, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        return p

    def _wait_port(self, port: int, proc: subprocess.Popen, what: str, deadline: float) -> None:
        while not listening(port):
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not listening on {port} after {self.start_timeout:.0f}s")
            time.sleep(0.2)

    def start(self) -> float:
        t0 = time.monotonic()
        deadline = t0 + self.start_timeout
        link = self._spawn([_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                            "--database", ":flwr-in-memory:", "--host", "127.0.0.1",
                            "--port", str(self.link_port)], "superlink")
        self._wait_port(self.link_port, link, "flower-superlink", deadline)
        ports = []
        for i in range(self.nodes):
            port = free_port()
            ports.append(port)
            self._spawn([_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.link_port}",
                         "--port", str(port), "--node-config", f"partition-id={i} num-partitions={self.nodes}"],
                        f"supernode-{i}")
        for i, port in enumerate(ports):
            self._wait_port(port, self.procs[1 + i], f"flower-supernode {i}", deadline)
        return round(time.monotonic() - t0, 2)

    def processes(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for p in self.procs:
            if p.poll() is None:
                try:
                    found[p.pid] = psutil.Process(p.pid)
                except psutil.Error:
                    pass
        for p in tagged(self.tag):
            found.setdefault(p.pid, p)
        return list(found.values())

    def stop(self) -> list[str]:
        killed = kill_processes(self.processes())
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for f in self.logs:
            f.close()
        return killed

    def __enter__(self) -> "FlowerDeployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# -------------------------------------------------------------------- analysis

def read_stamps(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def round_times(stamps: list[dict], rounds: int) -> dict:
    start = {s["round"]: s["t"] for s in stamps if s.get("event") == "round_start"}
    end = {s["round"]: s["t"] for s in stamps if s.get("event") == "round_end"}
    rin = {s["round"]: s for s in stamps if s.get("event") == "replies_in"}
    done = sorted(r for r in start if r in end)
    if not done:
        return {"rounds_done": 0}
    # round r lasts from its start to the next round's start (the last: to its own end)
    dur = [(start[r + 1] if r + 1 in start else end[r]) - start[r] for r in done]
    wall = end[done[-1]] - start[done[0]]
    out = {
        "rounds_done": len(done),
        "round_s": [round(d, 3) for d in dur],
        "collect_s": [round(rin[r]["t"] - start[r], 3) for r in done if r in rin],
        "aggregate_s": [round(end[r] - rin[r]["t"], 4) for r in done if r in rin],
        "replies": [rin[r].get("replies") for r in done if r in rin],
        "errors": [rin[r].get("errors") for r in done if r in rin],
        "reply_bytes": [rin[r].get("reply_bytes") for r in done if r in rin],
        "wall_of_rounds_s": round(wall, 3),
        "per_round_s": round(wall / len(done), 3),
        "round_median_s": round(statistics.median(dur), 3),
        "round_median_excl_first_s": round(statistics.median(dur[1:]), 3) if len(dur) > 1 else None,
        "round_min_s": round(min(dur), 3), "round_max_s": round(max(dur), 3),
    }
    ready = [s for s in stamps if s.get("event") == "nodes_ready"]
    if ready:
        out["nodes_ready_wait_s"] = round(ready[0].get("waited_s", 0.0), 3)
    return out


def idle_memory(tag: str) -> dict:
    procs = TreeCollector(match_env=(TAG_KEY, tag)).collect(None)
    rss, pss, _ = sample_memory(procs)
    return {"procs": len(procs), "rss_mb": round(rss / MIB, 1), "pss_mb": None if pss is None else round(pss / MIB, 1)}


# ----------------------------------------------------------------- Flower side

def run_flower(nodes: int, rounds: int, reply_floats: int = TINY_FLOATS, poll: float | None = None,
               keep_global: bool = False, *, timeout: float = 1800.0, min_free_gb: float = 3.0,
               pss_interval: float = 1.0, keep_workdir: bool = False) -> dict:
    """One Flower deployment run: start SuperLink + ``nodes`` SuperNodes, ``flwr run`` ``rounds``
    rounds of the echo app (each reply ``reply_floats`` float32 values), verify, tear down.
    ``poll``: None = Grid.send_and_receive as shipped (3 s pulls), else the pull interval in s."""
    tag = uuid.uuid4().hex
    work = Path(tempfile.mkdtemp(prefix="dvf-"))
    stamps_path = work / "stamps.jsonl"
    res: dict = {"nodes": nodes, "rounds": rounds, "reply_floats": reply_floats,
                 "reply_bytes_each": reply_floats * 4, "poll": "stock" if poll is None else poll,
                 "keep_global": keep_global, "loadavg_1m_before": round(os.getloadavg()[0], 2)}
    problems: list[str] = []
    dep = FlowerDeployment(work, nodes, tag)
    guard = MemoryGuard(min_free_gb * 2**30, lambda: kill_processes(dep.processes(), grace=1.0))
    guard.start()
    try:
        log(f"[flower] starting SuperLink + {nodes} SuperNodes (work dir {work})")
        res["startup_s"] = dep.start()
        time.sleep(1.0)
        res["idle_memory"] = idle_memory(tag)
        log(f"[flower] up in {res['startup_s']}s, idle RSS {res['idle_memory']['rss_mb']:.0f} MB; "
            f"flwr run: {rounds} rounds, replies of {reply_floats * 4 / MIB:.3g} MiB, poll {res['poll']}")
        cfg = (f"num-server-rounds={rounds} num-nodes={nodes} reply-floats={reply_floats} "
               f"global-floats={TINY_FLOATS} keep-global={'true' if keep_global else 'false'} "
               f"poll-interval={0.0 if poll is None else float(poll)} stamps-path='{stamps_path}'")
        cmd = [_bin("flwr"), "run", str(FLOWER_APP), "deploy", "--stream", "-c", cfg]
        res["cmd"] = cmd
        with open(work / "logs" / "flwr_run.log", "wb") as lf:
            m = measure(cmd, env=dep.env, match_env=(TAG_KEY, tag), cwd=str(work), timeout=timeout,
                        stdout=lf, stderr=subprocess.STDOUT, interval=0.25, pss_interval=pss_interval)
        res.update({k: m[k] for k in ("wall_s", "peak_rss_mb", "peak_pss_mb", "rc", "timed_out", "cpu_s",
                                      "background_cores", "sampler_cpu_s")})
        res["peak_procs_top"] = m["peak_procs"][:12]
        res["peak_proc_count"] = len(m["peak_procs"])
        if guard.tripped:
            problems.append(guard.tripped)
        ls = flwr_ls(dep.env, "deploy")
        runs = ls.get("runs") or []
        res["flwr_ls_status"] = [r.get("status") for r in runs]
        if m["rc"] != 0:
            problems.append(f"flwr run exited {m['rc']}" + (" (timeout)" if m["timed_out"] else ""))
        if res["flwr_ls_status"] != ["finished:completed"]:
            problems.append(f"flwr ls statuses {res['flwr_ls_status']} (expected one finished:completed)")
        stamps = read_stamps(stamps_path)
        res["stamps"] = stamps
        res.update(round_times(stamps, rounds))
        if res.get("rounds_done") != rounds:
            problems.append(f"{res.get('rounds_done')} of {rounds} rounds finished")
        if any(r != nodes for r in res.get("replies", [])) or any(res.get("errors", [])):
            problems.append(f"replies per round {res.get('replies')}, errors {res.get('errors')} "
                            f"(expected {nodes}, 0)")
    except Exception as e:  # noqa: BLE001 - recorded, the run counts as failed
        problems.append(f"{type(e).__name__}: {e}")
        if guard.tripped and guard.tripped not in problems:
            problems.append(guard.tripped)
    finally:
        guard.stop()
        res["killed_after"] = dep.stop()
        time.sleep(0.5)
        left = tagged(tag)
        if left:
            res["stray_killed"] = kill_processes(left)
            left = tagged(tag)
        if left:
            problems.append(f"processes still alive after cleanup: {[p.pid for p in left]}")
        res["min_mem_available_gb"] = (None if guard.min_seen == float("inf")
                                       else round(guard.min_seen / 2**30, 2))
        res["ok"] = not problems
        res["problems"] = problems
        if problems:
            for name in ("flwr_run", "superlink", "supernode-0"):
                p = work / "logs" / f"{name}.log"
                if p.exists():
                    res.setdefault("log_tails", {})[name] = p.read_text(errors="replace")[-2500:]
            log(f"[flower] run FAILED: {problems}")
        if keep_workdir:
            res["workdir"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    log(f"[flower] N={nodes} ok={res['ok']} per-round {res.get('per_round_s')}s median "
        f"{res.get('round_median_s')}s wall {res.get('wall_s')}s peak RSS {res.get('peak_rss_mb')} MB "
        f"other load {res.get('background_cores')} cores")
    return res


# --------------------------------------------------------------- fedadapt side

def _fedadapt_deploy(args: list[str], timeout: float, pss_interval: float) -> tuple[dict, dict]:
    """Run benchmarks/fedadapt_deploy.py with ``args`` under ``measure`` (its whole process tree: the
    coordinator and the client processes); returns (measurement, the script's JSON result)."""
    tag = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="dvf-fedadapt-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [str(PROJECT_PYTHON), str(BENCH_DIR / "fedadapt_deploy.py"), *args, "--json", str(out)]
        with open(Path(tmp) / "log", "wb") as lf:
            m = measure(cmd, env={**os.environ, TAG_KEY: tag}, match_env=(TAG_KEY, tag), cwd=str(REPO),
                        timeout=timeout, stdout=lf, stderr=subprocess.STDOUT, interval=0.25,
                        pss_interval=pss_interval)
        result = json.loads(out.read_text()) if out.exists() else {}
        if m["rc"] != 0:
            m["log_tail"] = (Path(tmp) / "log").read_text(errors="replace")[-2500:]
    return m, result


def run_fedadapt(nodes: int, rounds: int, reply_floats: int = TINY_FLOATS, poll: float | None = None,
                 keep_global: bool = False, *, timeout: float = 1800.0, min_free_gb: float = 3.0,
                 pss_interval: float = 1.0, keep_workdir: bool = False) -> dict:
    """One fedadapt deployment run: `fedadapt server start` + ``nodes`` persistent echo client agents
    (benchmarks/fedadapt_deploy.py overhead), ``rounds`` rounds of FedAvg on a 2.4k-parameter MLP that
    every client sends straight back. A round's time is the period between consecutive round commits in
    the coordinator's database, from round 3 on (rounds 1-2 include first contact and model building).
    There is no pull interval to tune: tasks are delivered on each client's open stream."""
    res: dict = {"nodes": nodes, "rounds": rounds, "reply_bytes_each": 2436 * 4, "poll": "stream",
                 "loadavg_1m_before": round(os.getloadavg()[0], 2)}
    hosts = max(1, min(5, nodes // 10))  # client agents are spread over a few processes, as on a few machines
    m, result = _fedadapt_deploy(["overhead", "--clients", str(nodes), "--rounds", str(rounds + 2),
                                  "--hosts", str(hosts)], timeout, pss_interval)
    res.update({k: m[k] for k in ("wall_s", "peak_rss_mb", "peak_pss_mb", "rc", "timed_out", "cpu_s",
                                  "background_cores", "sampler_cpu_s")})
    problems = [f"fedadapt_deploy.py exited {m['rc']}: {m.get('log_tail', '')[-400:]}"] if m["rc"] else []
    periods = [ms / 1000 for ms in result.get("round_period_ms", [])]
    if len(periods) != rounds or any(n != nodes for n in result.get("results_per_round", [])):
        problems.append(f"round periods {len(periods)}, results per round {result.get('results_per_round')}")
    if periods:
        res.update({"round_s": [round(d, 4) for d in periods], "per_round_s": round(statistics.mean(periods), 4),
                    "round_median_s": round(statistics.median(periods), 4),
                    "coordinator_cpu_ms_per_round": round(result["coordinator_cpu_ms_per_round"], 1),
                    "replies": result.get("results_per_round")})
    res["ok"], res["problems"] = not problems, problems
    log(f"[fedadapt] N={nodes} ok={res['ok']} round median {res.get('round_median_s')}s, coordinator CPU "
        f"{res.get('coordinator_cpu_ms_per_round')} ms/round, peak RSS {res.get('peak_rss_mb')} MB")
    return res


def fedadapt_upload(mib: float, repeats: int, timeout: float, pss_interval: float) -> dict:
    """fedadapt's upload throughput, measured directly: one client pushes ``mib`` MiB (3 MiB chunks, sha256
    of the whole checked by the coordinator) to a running coordinator; the median push time of ``repeats``."""
    m, result = _fedadapt_deploy(["upload", "--mib", str(int(mib)), "--repeats", str(repeats)], timeout,
                                 pss_interval)
    if m["rc"] or not result:
        return {"MBps": None, "reason": f"fedadapt_deploy.py exited {m['rc']}: {m.get('log_tail', '')[-400:]}"}
    _, ceiling = _fedadapt_deploy(["grpc-ceiling", "--mib", str(int(mib)), "--repeats", str(repeats)], timeout,
                                  pss_interval)
    return {"MBps": round(result["mb_per_s"], 1), "median_s": round(result["median_s"], 4),
            "seconds": result["seconds"], "peak_rss_mb": m["peak_rss_mb"], "background_cores": m["background_cores"],
            "grpc_ceiling_MBps": round(ceiling["mb_per_s"], 1) if ceiling else None,
            "method": "direct: median time of one PushResult, sender's sha256 included; grpc_ceiling: the same "
                      "bytes and chunks through grpcio with no protobuf, hashing or checks"}


# ------------------------------------------------------------------- scenarios

def summarize_runs(runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("ok")]
    rounds = [d for r in ok for d in r.get("round_s", [])]
    out = {"ok_runs": len(ok), "runs": len(runs)}
    if ok:
        out.update({
            "per_round_s_median": statistics.median(r["per_round_s"] for r in ok),
            "round_median_s": round(statistics.median(rounds), 3),
            "round_median_excl_first_s": (round(statistics.median(
                [d for r in ok for d in r.get("round_s", [])[1:]]), 3)
                if any(len(r.get("round_s", [])) > 1 for r in ok) else None),
            "round_min_s": min(rounds), "round_max_s": max(rounds),
            "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in ok),
            "peak_pss_mb_median": (statistics.median(r["peak_pss_mb"] for r in ok)
                                   if all(r.get("peak_pss_mb") for r in ok) else None),
            "idle_rss_mb_median": _median_of(r.get("idle_memory", {}).get("rss_mb") for r in ok),
            "startup_s_median": _median_of(r.get("startup_s") for r in ok),
            "cpu_s_median": statistics.median(r["cpu_s"] for r in ok),
            "background_cores_max": max((r.get("background_cores") or 0) for r in ok),
        })
    return out


def _median_of(values) -> float | None:
    """Median of what was measured (fedadapt's runs have no separate start-up or idle phase)."""
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def upload_throughput(tiny: dict, big: dict, nodes: int, reply_bytes: int) -> dict:
    if not (tiny.get("ok_runs") and big.get("ok_runs")):
        return {"MBps": None, "reason": "a run failed"}
    extra = big["round_median_s"] - tiny["round_median_s"]
    out = {"bytes_per_round": nodes * reply_bytes, "round_median_tiny_s": tiny["round_median_s"],
           "round_median_big_s": big["round_median_s"], "extra_s": round(extra, 3)}
    out["MBps"] = round(nodes * reply_bytes / extra / 1e6, 1) if extra > 0 else None
    if extra <= 0:
        out["reason"] = "100 MiB rounds were not slower than tiny rounds (noise); rerun with more rounds"
    return out


def run_side(runner, args, side: str) -> dict:
    poll_of = {"stock": None}
    out: dict = {"overhead": {}, "upload": {}}
    if args.only in (None, "overhead"):
        for poll_s in args.poll.split(","):
            poll = poll_of.get(poll_s, None if poll_s == "stock" else float(poll_s))
            key = f"poll={poll_s}"
            out["overhead"][key] = {}
            nodes = args.flower_nodes if side == "flower" else args.nodes
            for n in [int(x) for x in nodes.split(",")]:
                runs = []
                for i in range(args.repeats):
                    log(f"[{side}] overhead {key} N={n} run {i + 1}/{args.repeats}")
                    runs.append(runner(n, args.rounds, TINY_FLOATS, poll, False, timeout=args.timeout,
                                       min_free_gb=args.min_free_gb, pss_interval=args.pss_interval,
                                       keep_workdir=args.keep_workdir))
                summ = summarize_runs(runs)
                out["overhead"][key][str(n)] = {"summary": summ, "runs": runs}
                if not summ["ok_runs"]:
                    reasons = sorted({p for r in runs for p in r.get("problems", [])})
                    out["overhead"][key][str(n)]["infeasible_reason"] = reasons
                    log(f"[{side}] N={n} failed ({reasons}); not trying larger N for {key}")
                    break
    if args.only in (None, "upload") and side == "fedadapt":
        log(f"[fedadapt] upload of {args.upload_mib:g} MiB, {args.repeats * 5} pushes")
        out["upload"] = {"reply_mib": args.upload_mib, "throughput": fedadapt_upload(
            args.upload_mib, args.repeats * 5, args.timeout, args.pss_interval)}
    elif args.only in (None, "upload"):
        poll = None if args.upload_poll == "stock" else float(args.upload_poll)
        n, big_floats = 2, int(args.upload_mib * MIB) // 4
        runs_t, runs_b = [], []
        for i in range(args.repeats):  # interleave tiny and big, so slow drift hits both
            log(f"[{side}] upload baseline (tiny replies) run {i + 1}/{args.repeats}")
            runs_t.append(runner(n, args.upload_rounds, TINY_FLOATS, poll, True, timeout=args.timeout,
                                 min_free_gb=args.min_free_gb, pss_interval=args.pss_interval,
                                 keep_workdir=args.keep_workdir))
            log(f"[{side}] upload ({args.upload_mib:g} MiB replies) run {i + 1}/{args.repeats}")
            runs_b.append(runner(n, args.upload_rounds, big_floats, poll, True, timeout=args.timeout,
                                 min_free_gb=args.min_free_gb, pss_interval=args.pss_interval,
                                 keep_workdir=args.keep_workdir))
        st, sb = summarize_runs(runs_t), summarize_runs(runs_b)
        out["upload"] = {"poll": args.upload_poll, "nodes": n, "reply_mib": args.upload_mib,
                         "tiny": {"summary": st, "runs": runs_t}, "big": {"summary": sb, "runs": runs_b},
                         "throughput": upload_throughput(st, sb, n, big_floats * 4)}
    return out


# ------------------------------------------------------------------------ main

def render(sides: dict) -> str:
    lines = ["| side | scenario | N | ok | per-round (s) = wall/R | round median (s) | min-max (s) | "
             "peak RSS (MB) | peak PSS (MB) | idle RSS (MB) | other load (cores, max) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for side, d in sides.items():
        if "skipped" in d:
            lines.append(f"| {side} | skipped: {d['skipped']} |||||||||| ")
            continue
        for key, per_n in d.get("overhead", {}).items():
            for n, e in per_n.items():
                s = e["summary"]
                if not s["ok_runs"]:
                    lines.append(f"| {side} | overhead {key} | {n} | 0/{s['runs']} | infeasible: "
                                 f"{'; '.join(e.get('infeasible_reason', []))[:160]} |||||| |")
                    continue
                lines.append(f"| {side} | overhead {key} | {n} | {s['ok_runs']}/{s['runs']} | "
                             f"{s['per_round_s_median']:.2f} | {s['round_median_s']:.2f} | "
                             f"{s['round_min_s']:.2f}-{s['round_max_s']:.2f} | {s['peak_rss_mb_median']:.0f} | "
                             f"{s['peak_pss_mb_median'] or 0:.0f} | {_mb(s['idle_rss_mb_median'])} | "
                             f"{s['background_cores_max']} |")
        up = d.get("upload") or {}
        for which in ("tiny", "big"):
            if which in up:
                s = up[which]["summary"]
                label = f"upload {which} poll={up['poll']}"
                if s["ok_runs"]:
                    lines.append(f"| {side} | {label} | {up['nodes']} | {s['ok_runs']}/{s['runs']} | "
                                 f"{s['per_round_s_median']:.2f} | {s['round_median_s']:.2f} | "
                                 f"{s['round_min_s']:.2f}-{s['round_max_s']:.2f} | {s['peak_rss_mb_median']:.0f} | "
                                 f"{s['peak_pss_mb_median'] or 0:.0f} | {_mb(s['idle_rss_mb_median'])} | "
                                 f"{s['background_cores_max']} |")
                else:
                    lines.append(f"| {side} | {label} | {up['nodes']} | 0/{s['runs']} | failed |||||| |")
        if up.get("throughput"):
            t = up["throughput"]
            how = (f"{t.get('median_s')} s per push" if "median_s" in t else
                   f"{t.get('bytes_per_round', 0) / 1e6:.0f} MB in {t.get('extra_s')} s extra per round")
            lines.append(f"| {side} | **upload throughput** | {up.get('nodes', 1)} | | "
                         f"**{t.get('MBps')} MB/s** ({how}) ||||||| ")
    return "\n".join(lines) + "\n\n" + render_ratios(sides)


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def raw_socket_mbps() -> float | None:
    """The raw loopback baseline measured by benchmarks/loopback_socket.py, if it has been run."""
    path = RESULTS / "loopback_socket.json"
    return json.loads(path.read_text()).get("MBps_median") if path.exists() else None


def render_ratios(sides: dict) -> str:
    """fedadapt against Flower per N (round time), and both uploads against a raw loopback socket."""
    fa, fl = sides.get("fedadapt", {}), sides.get("Flower 1.42", {})
    lines = ["| N clients | fedadapt round median (s) | fedadapt coordinator CPU per round (ms) | "
             "Flower round median (s) | Flower / fedadapt |", "|---|---|---|---|---|"]
    fa_over = next(iter(fa.get("overhead", {}).values()), {})
    fl_over = next(iter(fl.get("overhead", {}).values()), {})
    for n, e in fa_over.items():
        mine, theirs = e["summary"], fl_over.get(n, {}).get("summary", {})
        if not mine.get("ok_runs"):
            continue
        cpu = statistics.median(r["coordinator_cpu_ms_per_round"] for r in e["runs"] if r.get("ok"))
        flower = (f"{theirs['round_median_s']:.2f} | {theirs['round_median_s'] / mine['round_median_s']:.0f}x"
                  if theirs.get("ok_runs") else "not run (memory) | -")
        lines.append(f"| {n} | {mine['round_median_s']:.3f} | {cpu:.0f} | {flower} |")
    raw = raw_socket_mbps()
    up = [(side, d.get("upload", {}).get("throughput", {}).get("MBps")) for side, d in sides.items()]
    lines += ["", "| upload of 100 MiB | MB/s | raw loopback socket / this |", "|---|---|---|"]
    for side, mbps in up:
        if mbps:
            lines.append(f"| {side} | {mbps} | {raw / mbps:.2f}x |" if raw else f"| {side} | {mbps} | - |")
    ceiling = fa.get("upload", {}).get("throughput", {}).get("grpc_ceiling_MBps")
    if ceiling and raw:
        lines.append(f"| grpcio alone, same 3 MiB chunks (no protobuf, no sha256) | {ceiling} | {raw / ceiling:.2f}x |")
    if raw:
        lines.append(f"| raw loopback socket (benchmarks/loopback_socket.py) | {raw} | 1.00x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=1, help="runs per scenario (each gives R round times)")
    ap.add_argument("--nodes", default="2,10,50",
                    help="fedadapt client counts for the overhead measurement (default 2,10,50)")
    ap.add_argument("--flower-nodes", default="2,10",
                    help="SuperNode counts, tried in order; stops at the first N that fails (default 2,10: "
                         "at 50 Flower's per-message ClientApp processes outgrew this 24 GB machine)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per overhead run (default 5)")
    ap.add_argument("--poll", default="stock", help="pull intervals for the overhead runs: 'stock' "
                    "(Flower's 3 s) and/or seconds, comma-separated (default: stock)")
    ap.add_argument("--upload-mib", type=float, default=100.0)
    ap.add_argument("--upload-rounds", type=int, default=6)
    ap.add_argument("--upload-poll", default="0.05", help="pull interval for the upload runs (default 0.05)")
    ap.add_argument("--only", choices=("overhead", "upload"), default=None)
    ap.add_argument("--skip-flower", action="store_true")
    ap.add_argument("--skip-fedadapt", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per `flwr run` limit in seconds")
    ap.add_argument("--min-free-gb", type=float, default=3.0,
                    help="kill the deployment if MemAvailable drops below this (shared machine)")
    ap.add_argument("--pss-interval", type=float, default=1.0)
    ap.add_argument("--keep-workdir", action="store_true")
    add_json_args(ap, RESULTS_JSON, "the tables")
    args = ap.parse_args(argv)
    if args.report:
        return print_report(args.json, lambda data: render(data["sides"]), {"load average at end": "loadavg_at_end"})

    started = harness.utc_now()
    sides: dict[str, dict] = {}
    try:
        if args.skip_fedadapt:
            sides["fedadapt"] = {"skipped": "--skip-fedadapt"}
        else:
            sides["fedadapt"] = run_side(run_fedadapt, args, "fedadapt")
        if args.skip_flower:
            sides["Flower 1.42"] = {"skipped": "--skip-flower"}
        else:
            if not Path(_bin("flower-superlink")).exists():
                raise SystemExit(f"{FLOWER_VENV} has no flower-superlink: create it with "
                                 "benchmarks/overhead_vs_flower.py first")
            sides["Flower 1.42"] = run_side(run_flower, args, "flower")
    finally:
        data = {
            "benchmark": "deploy_vs_flower",
            "started_utc": started,
            "finished_utc": harness.utc_now(),
            "command": harness.command_line(),
            "workload": {
                "overhead": f"numpy echo ClientApp, {TINY_FLOATS} float32 reply, stock FedAvg, all N "
                            f"nodes sampled, {args.rounds} rounds",
                "upload": f"2 nodes, each reply {args.upload_mib:g} MiB float32, global model "
                          f"{TINY_FLOATS} float32 (keep-global), {args.upload_rounds} rounds",
            },
            "method": ("per-round = (last round_end - first round_start) / R from the ServerApp's stamps; "
                       "round_s = start of round r to start of round r+1 (last: to its end); peak RSS/PSS = "
                       "max over samples of the sum over every process with the run's env tag during "
                       "`flwr run`; idle RSS = the same right before `flwr run`; background_cores = CPU "
                       "of all other processes / wall (0 on a quiet machine)"),
            "args": vars(args) | {"json": str(args.json)},
            "machine": harness.machine_facts(flower_venv=(flower_bin("python"), ["flwr", "numpy"])),
            "loadavg_at_end": os.getloadavg(),
            "sides": sides,
        }
        harness.write_json(args.json, data)
    print(render(sides))
    print(f"\nRaw runs: {args.json}")
    bad = [r for d in sides.values() for per in d.get("overhead", {}).values() for e in per.values()
           for r in e["runs"] if not r.get("ok")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
