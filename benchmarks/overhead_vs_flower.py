#!/usr/bin/env python3
"""Side-by-side framework-overhead benchmark: fedadapt vs Flower 1.42.

Both sides run the same trivial workload, so what is measured is framework
overhead (startup, orchestration, messaging, teardown), not training:

    MLP 32->64->4 (~2.4k params), 10 clients all sampled every round, 5 rounds,
    64 synthetic samples per client, 1 SGD step per round, no evaluation.

For each side the whole command is timed (wall clock, cold process start to
exit) and its memory is sampled every 0.1 s (see benchmarks/measure.py): the sum
of RSS and PSS over every process of the run.

* fedadapt: ``/work/main/.venv/bin/fedadapt simulate benchmarks/trivial.toml --out <tmp>``
  (its process tree).
* Flower:   ``flwr run benchmarks/flower_app local --stream --federation-config
  "num-supernodes=10"`` inside ``benchmarks/.venv-flower`` (created on first use),
  counting the ``flwr`` CLI plus the detached local SuperLink, its SuperExec,
  ``flwr-simulation`` and every Ray process. Each repeat gets a fresh FLWR_HOME
  and RAY_TMPDIR and a cold local SuperLink, which is killed by PID afterwards.

Usage (from the repo root, with the project venv, which has psutil):

    .venv/bin/python benchmarks/overhead_vs_flower.py --repeats 3 [--skip-fedadapt] [--skip-flower]

Prints a markdown table and writes the raw runs to
benchmarks/results/overhead_vs_flower.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from flower_env import FLOWER_READY, FLOWER_VENV, ensure_flower_venv, flower_bin, flower_process_env, flwr_ls  # noqa: E402
from harness import BENCH_DIR, PROJECT_PYTHON, REPO, RESULTS, command_line, kill_processes, log, record_problems  # noqa: E402

FLOWER_APP = BENCH_DIR / "flower_app"
RESULTS_JSON = RESULTS / "overhead_vs_flower.json"
FEDADAPT_BIN = PROJECT_PYTHON.parent / "fedadapt"
FEDADAPT_CONFIG = BENCH_DIR / "trivial.toml"

LOCAL_SUPERLINK_PORT = 39091
NUM_CLIENTS = 10
NUM_ROUNDS = 5
TAG_KEY = "FEDADAPT_BENCH_TAG"  # put in every measured command's env to find all its processes

WORKLOAD = {
    "model": "MLP 32->64->4",
    "clients": NUM_CLIENTS,
    "clients_per_round": NUM_CLIENTS,
    "rounds": NUM_ROUNDS,
    "samples_per_client": 64,
    "local_sgd_steps": 1,
    "evaluation": False,
}


# ------------------------------------------------------------ psutil bootstrap

try:
    import psutil  # noqa: F401
except ImportError:  # pragma: no cover - only when run with a python lacking psutil
    _fpy = flower_bin("python")
    if os.environ.get("_OVERHEAD_BENCH_REEXEC") or not FLOWER_READY.exists():
        sys.exit("psutil is missing: run this with the project venv, e.g. "
                 ".venv/bin/python benchmarks/overhead_vs_flower.py ...")
    log(f"[setup] psutil missing in {sys.executable}; re-running under {_fpy}")
    os.environ["_OVERHEAD_BENCH_REEXEC"] = "1"
    os.execv(str(_fpy), [str(_fpy), *sys.argv])

import psutil  # noqa: E402
from measure import matching_processes, measure, summarize  # noqa: E402

# ----------------------------------------------------------- process control

def local_superlinks() -> list[psutil.Process]:
    """Processes serving the local simulation SuperLink (port 39091)."""
    found: dict[int, psutil.Process] = {}
    try:
        for c in psutil.net_connections(kind="tcp"):
            if (c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == LOCAL_SUPERLINK_PORT
                    and c.pid):
                try:
                    found[c.pid] = psutil.Process(c.pid)
                except psutil.Error:
                    pass
    except psutil.Error:
        pass
    for p in psutil.process_iter(["cmdline"]):
        cl = p.info.get("cmdline") or []
        if any(a.endswith("flower-superlink") for a in cl[:2]) and str(LOCAL_SUPERLINK_PORT) in cl:
            found[p.pid] = p
    return list(found.values())


def tagged_processes(tag_value: str | None = None) -> list[psutil.Process]:
    """Processes started by this benchmark (env has TAG_KEY[=tag_value])."""
    return matching_processes(match_env=(TAG_KEY, tag_value))


def flower_venv_processes() -> list[psutil.Process]:
    """Processes running out of benchmarks/.venv-flower: its path is in their cmdline, or (Ray
    workers, whose argv is rewritten to `ray::...` and whose environment Ray rebuilds) in
    their memory maps."""
    venv = str(FLOWER_VENV)
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if p.pid in me:
            continue
        cl = p.info.get("cmdline") or []
        if any(venv in a for a in cl):
            out.append(p)
        elif cl and cl[0].startswith("ray::"):
            try:
                with open(f"/proc/{p.pid}/maps") as f:
                    if venv in f.read():
                        out.append(p)
            except OSError:
                pass
    return out


# ------------------------------------------------------------------- flower

def flower_run_env(work: Path, tag: str) -> dict[str, str]:
    """A Flower run's environment: FLWR_HOME and RAY_TMPDIR under ``work``, tagged with ``tag``."""
    return flower_process_env(work / "flwr_home", RAY_TMPDIR=str(work / "ray"), **{TAG_KEY: tag})


def _flower_match(cmdline: list[str]) -> bool:
    head = cmdline[0] if cmdline else ""
    if head.startswith("ray::"):
        return True
    venv = str(FLOWER_VENV)
    return any(venv in a for a in cmdline[:3])


SAMPLE_INTERVAL = 0.1  # seconds; --interval
FEDADAPT_COLD_CACHE = False  # --fedadapt-cache cold
PSS_INTERVAL = 0.5     # seconds; --pss-interval


def _start_local_superlink(env: dict[str, str]) -> float:
    """Start the local SuperLink outside the measurement (any `flwr` command against
    the `local` connection spawns it); return the seconds it took."""
    t0 = time.perf_counter()
    subprocess.run([str(flower_bin("flwr")), "ls", "local", "--format", "json"], env=env,
                   capture_output=True, timeout=120)
    if not local_superlinks():
        raise RuntimeError("could not pre-start the local SuperLink")
    return round(time.perf_counter() - t0, 2)


def run_flower_once(work: Path, timeout: float, warm_superlink: bool = False) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex
    env = flower_run_env(work, tag)
    model_path = work / "out" / "final_model.pt"
    cmd = [str(flower_bin("flwr")), "run", str(FLOWER_APP), "local", "--stream",
           "--federation-config", f"num-supernodes={NUM_CLIENTS}",
           "-c", f"num-server-rounds={NUM_ROUNDS} num-clients={NUM_CLIENTS} out-path='{model_path}'"]

    leftovers = kill_processes(local_superlinks())
    if leftovers:
        log(f"[flower] killed leftover local SuperLink processes: {leftovers}")
    prestart = None
    if warm_superlink:  # SuperLink already running (not timed; its memory IS counted)
        prestart = _start_local_superlink(env)
        time.sleep(1.0)

    log_path = work / "flwr_run.log"
    with open(log_path, "wb") as lf:
        res = measure(cmd, env=env, match=_flower_match, match_env=(TAG_KEY, tag),
                      cwd=str(REPO), timeout=timeout, stdout=lf, stderr=subprocess.STDOUT,
                      interval=SAMPLE_INTERVAL, pss_interval=PSS_INTERVAL)
    res["cmd"] = cmd
    res["superlink"] = "warm" if warm_superlink else "cold"
    if prestart is not None:
        res["superlink_prestart_s"] = prestart

    # ---- verify (P5: `flwr run --stream` exits 0 even when the run failed)
    problems = []
    ls = flwr_ls(env, "local")
    runs = ls.get("runs") or []
    statuses = [r.get("status") for r in runs]
    res["flwr_ls_status"] = statuses
    if runs:
        res["flwr_ls_elapsed_s"] = runs[-1].get("elapsed")
    if res["rc"] != 0:
        problems.append(f"flwr run exited {res['rc']}")
    if statuses != ["finished:completed"]:
        problems.append(f"flwr ls: statuses {statuses!r} (expected one finished:completed)")
    sidecar = Path(str(model_path) + ".json")
    if not model_path.is_file() or model_path.stat().st_size == 0:
        problems.append(f"model file {model_path} missing")
    if sidecar.is_file():
        meta = json.loads(sidecar.read_text())
        res["serverapp_main_s"] = meta.get("serverapp_main_s")
        rpr = meta.get("replies_per_round", {})
        if [rpr.get(str(i)) for i in range(1, NUM_ROUNDS + 1)] != [NUM_CLIENTS] * NUM_ROUNDS:
            problems.append(f"replies per round {rpr} (expected {NUM_CLIENTS} x {NUM_ROUNDS})")
    else:
        problems.append("model sidecar json missing")

    # ---- clean up: the detached local SuperLink (+ SuperExec), then anything else tagged
    killed = kill_processes(local_superlinks())
    time.sleep(0.5)
    stray = kill_processes(tagged_processes(tag) + flower_venv_processes())
    res["killed_after"] = killed
    if stray:
        res["stray_killed"] = stray
        log(f"[flower] killed stray processes after the run: {stray}")
    remaining = [p.pid for p in tagged_processes(tag) + flower_venv_processes()]
    if remaining:
        problems.append(f"processes still alive after cleanup: {remaining}")
    return record_problems(res, problems, "flower", log_path)


# ----------------------------------------------------------------- fedadapt

def fedadapt_missing() -> str | None:
    missing = [str(p) for p in (FEDADAPT_BIN, FEDADAPT_CONFIG) if not p.exists()]
    return f"missing {', '.join(missing)}" if missing else None


def run_fedadapt_once(work: Path, timeout: float) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    out_dir = work / "out"
    tag = uuid.uuid4().hex
    env = dict(os.environ)
    env[TAG_KEY] = tag
    if FEDADAPT_COLD_CACHE:  # no stored partition: this run imports flwr-datasets and computes it
        env["FEDADAPT_CACHE"] = tempfile.mkdtemp(prefix="fa-cache-", dir=work)
    cmd = [str(FEDADAPT_BIN), "simulate", str(FEDADAPT_CONFIG.relative_to(REPO)), "--out", str(out_dir)]
    log_path = work / "fedadapt.log"
    with open(log_path, "wb") as lf:
        res = measure(cmd, env=env, match=None, match_env=(TAG_KEY, tag), cwd=str(REPO),
                      timeout=timeout, stdout=lf, stderr=subprocess.STDOUT, interval=SAMPLE_INTERVAL,
                      pss_interval=PSS_INTERVAL)
    res["cmd"] = cmd
    problems = []
    if res["rc"] != 0:
        problems.append(f"fedadapt exited {res['rc']}")
    res["out_files"] = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file()) \
        if out_dir.exists() else []
    if not res["out_files"]:
        problems.append(f"no output files under {out_dir}")
    # anything it left running (detached workers etc.) is a bug worth reporting
    stray = kill_processes(tagged_processes(tag))
    if stray:
        res["stray_killed"] = stray
        problems.append(f"left processes running after exit: {stray}")
    return record_problems(res, problems, "fedadapt", log_path)


# ------------------------------------------------------------------ machine

def machine_facts(flower: bool, fedadapt: bool) -> dict:
    """The machine (harness.machine_facts), psutil's version and those of the venvs that ran."""
    venvs = {}
    if fedadapt and PROJECT_PYTHON.exists():
        venvs["fedadapt_venv"] = (PROJECT_PYTHON, ["fedadapt", "torch"])
    if flower:
        venvs["flower_venv"] = (flower_bin("python"), ["flwr", "torch", "ray"])
    return {**harness.machine_facts(**venvs), "psutil": psutil.__version__}


# ------------------------------------------------------------------- report

def _fmt(v, nd=2):
    return "n/a" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _ratio(a, b):
    return None if a in (None, 0) or b in (None, 0) else a / b


def render_table(sides: dict) -> str:
    rows = ["| side | ok runs | wall median (s) | wall min (s) | wall max (s) | peak RSS median (MB) "
            "| peak PSS median (MB) | CPU median (s) | other load (cores) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, s in sides.items():
        if s.get("skipped"):
            rows.append(f"| {name} | skipped: {s['skipped']} | | | | | | | |")
            continue
        sm = s["summary"]
        rows.append(
            f"| {name} | {sm['wall_s']['n']}/{len(s['runs'])} | {_fmt(sm['wall_s']['median'])} | "
            f"{_fmt(sm['wall_s']['min'])} | {_fmt(sm['wall_s']['max'])} | "
            f"{_fmt(sm['peak_rss_mb']['median'], 0)} | {_fmt(sm['peak_pss_mb']['median'], 0)} | "
            f"{_fmt(sm['cpu_s']['median'], 1)} | {_fmt(sm['background_cores']['max'])} (max) |")
    fa = sides.get("fedadapt", {})
    for name, fl in sides.items():
        if not name.startswith("Flower") or "summary" not in fa or "summary" not in fl:
            continue
        r = {k: _ratio(fa["summary"][k]["median"], fl["summary"][k]["median"])
             for k in ("wall_s", "peak_rss_mb", "peak_pss_mb", "cpu_s")}
        rmin = _ratio(fa["summary"]["wall_s"]["min"], fl["summary"]["wall_s"]["min"])
        rmax = _ratio(fa["summary"]["wall_s"]["max"], fl["summary"]["wall_s"]["max"])
        rows.append(f"| **fedadapt / {name}** | | **{_fmt(r['wall_s'])}x** | {_fmt(rmin)}x | "
                    f"{_fmt(rmax)}x | **{_fmt(r['peak_rss_mb'])}x** | **{_fmt(r['peak_pss_mb'])}x** | "
                    f"{_fmt(r['cpu_s'])}x | |")
    return "\n".join(rows)


def ratios(sides: dict) -> dict | None:
    """{flower side name: {metric_median: fedadapt / flower}}; None if nothing to compare."""
    fa = sides.get("fedadapt", {})
    out = {}
    for name, fl in sides.items():
        if name.startswith("Flower") and "summary" in fa and "summary" in fl:
            out[name] = {f"{k}_median": _ratio(fa["summary"][k]["median"], fl["summary"][k]["median"])
                         for k in ("wall_s", "peak_rss_mb", "peak_pss_mb", "cpu_s")}
    return out or None


# --------------------------------------------------------------------- main

IDLE_WAIT_S = 120.0    # --idle-wait
IDLE_THRESHOLD = 0.25  # --idle-threshold (busy cores)


def wait_for_quiet(name: str) -> dict:
    """Wait (up to IDLE_WAIT_S) until the machine is idle, so other work does not inflate wall."""
    q = harness.wait_for_quiet(name, IDLE_WAIT_S, IDLE_THRESHOLD)
    return {"pre_run_busy_cores": q.busy_cores, "waited_for_quiet_s": q.waited_s, "loadavg_1m": q.loadavg_1m}


def run_side(name: str, once, repeats: int, warmup: int, base: Path, timeout: float) -> dict:
    runs, warm = [], []
    for i in range(warmup + repeats):
        is_warm = i < warmup
        label = f"warm-up {i + 1}/{warmup}" if is_warm else f"run {i - warmup + 1}/{repeats}"
        quiet = wait_for_quiet(name)
        log(f"[{name}] {label} ...")
        r = once(base / f"{name}-{i}", timeout)
        r.update(quiet)
        r["warmup"] = is_warm
        log(f"[{name}] {label}: ok={r['ok']} wall={r['wall_s']:.2f}s "
            f"peakRSS={r['peak_rss_mb']:.0f}MB peakPSS={_fmt(r['peak_pss_mb'], 0)}MB "
            f"cpu={r['cpu_s']}s background={r['background_cores']} cores")
        if r["background_cores"] and r["background_cores"] > IDLE_THRESHOLD:
            log(f"[{name}] WARNING: other processes used {r['background_cores']} cores during "
                "this run; its wall time is not trustworthy")
        (warm if is_warm else runs).append(r)
    ok_runs = [r for r in runs if r["ok"]]
    return {"runs": runs, "warmup_runs": warm, "cmd": runs[0]["cmd"] if runs else None,
            "summary": summarize(ok_runs, ("wall_s", "peak_rss_mb", "peak_pss_mb", "cpu_s",
                                           "background_cores"))}


def main(argv: list[str] | None = None) -> int:
    global RESULTS_JSON, SAMPLE_INTERVAL, PSS_INTERVAL, IDLE_WAIT_S, IDLE_THRESHOLD, FEDADAPT_COLD_CACHE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="measured runs per side (default 3)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="unmeasured runs per side first, to warm the page cache (default 1)")
    ap.add_argument("--skip-fedadapt", action="store_true")
    ap.add_argument("--skip-flower", action="store_true")
    ap.add_argument("--flower-superlink", choices=("cold", "warm", "both"), default="cold",
                    help="cold (default): each Flower run starts the local SuperLink itself and "
                         "that is timed; warm: the SuperLink is started untimed just before the "
                         "run (its memory still counts), as for a user whose SuperLink daemon "
                         "is already up; both: one row each")
    ap.add_argument("--fedadapt-cache", choices=("warm", "cold"), default="warm",
                    help="warm (default): fedadapt reads the client partition it stored on an earlier "
                         "run (the warm-up); cold: every run starts from an empty cache")
    ap.add_argument("--timeout", type=float, default=600, help="per-run timeout in seconds")
    ap.add_argument("--interval", type=float, default=0.1, help="RSS sampling period (s)")
    ap.add_argument("--pss-interval", type=float, default=0.5,
                    help="PSS sampling period (s; PSS is costly to read, see measure.py)")
    ap.add_argument("--idle-wait", type=float, default=120,
                    help="before each run wait up to this many seconds for the machine to be idle")
    ap.add_argument("--idle-threshold", type=float, default=0.25,
                    help="'idle' = fewer than this many cores busy (default 0.25)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep logs/FLWR_HOME/outputs")
    ap.add_argument("--json", type=Path, default=None, help=f"output JSON (default {RESULTS_JSON})")
    args = ap.parse_args(argv)
    SAMPLE_INTERVAL, PSS_INTERVAL = args.interval, args.pss_interval
    FEDADAPT_COLD_CACHE = args.fedadapt_cache == "cold"
    IDLE_WAIT_S, IDLE_THRESHOLD = args.idle_wait, args.idle_threshold
    if args.json:
        RESULTS_JSON = args.json.resolve()

    exact_cmd = command_line()
    started = harness.utc_now()
    sides: dict[str, dict] = {}
    fedadapt_skip = "--skip-fedadapt" if args.skip_fedadapt else fedadapt_missing()
    if fedadapt_skip and not args.skip_fedadapt:
        log(f"[fedadapt] SKIPPED: {fedadapt_skip} (the fedadapt CLI or benchmarks/trivial.toml "
            "is not there yet)")

    if not args.skip_flower:
        ensure_flower_venv()
    work = Path(tempfile.mkdtemp(prefix="ovf-"))  # short: Ray's socket paths live under RAY_TMPDIR
    log(f"[bench] work dir {work}")
    try:
        if fedadapt_skip:
            sides["fedadapt"] = {"skipped": fedadapt_skip}
        else:
            sides["fedadapt"] = run_side("fedadapt", run_fedadapt_once, args.repeats, args.warmup,
                                         work, args.timeout)
        if args.skip_flower:
            sides["Flower 1.42"] = {"skipped": "--skip-flower"}
        else:
            if args.flower_superlink in ("cold", "both"):
                sides["Flower 1.42"] = run_side("flower", run_flower_once, args.repeats,
                                                args.warmup, work, args.timeout)
            if args.flower_superlink in ("warm", "both"):
                sides["Flower 1.42 (warm SuperLink)"] = run_side(
                    "flower-warm", lambda w, t: run_flower_once(w, t, warm_superlink=True),
                    args.repeats, args.warmup if args.flower_superlink == "warm" else 0,
                    work, args.timeout)
    finally:
        # belt and braces: nothing this benchmark started may outlive it
        stray = kill_processes(tagged_processes() +
                               (flower_venv_processes() if not args.skip_flower else []))
        if stray:
            log(f"[bench] killed stray processes at exit: {stray}")
        if args.keep_workdir:
            log(f"[bench] kept work dir {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    facts = machine_facts(flower=not args.skip_flower, fedadapt=not fedadapt_skip)
    table = render_table(sides)
    data = {
        "benchmark": "overhead_vs_flower",
        "started_utc": started,
        "command": exact_cmd,
        "workload": WORKLOAD,
        "method": ("wall = cold process start to exit of the command; peak RSS/PSS = max over "
                   "samples (RSS every sample_interval_s, PSS every pss_interval_s and at new "
                   "RSS peaks) of the sum over all processes of the run (fedadapt: its process "
                   "tree and anything carrying its env tag; Flower: flwr CLI + detached local "
                   "SuperLink/SuperExec + flwr-simulation + all Ray processes). cpu_s = CPU "
                   "time of those processes; background_cores = CPU used by every other "
                   "process / wall (should be ~0). Fresh FLWR_HOME, RAY_TMPDIR and a cold local "
                   "SuperLink per Flower run. Summary over successful measured runs."),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "sample_interval_s": args.interval,
        "pss_interval_s": args.pss_interval,
        "machine": facts,
        "sides": sides,
        "ratios_fedadapt_over_flower": ratios(sides),
    }
    harness.write_json(RESULTS_JSON, data)

    fv, av = facts.get("flower_venv", {}), facts.get("fedadapt_venv", {})
    print(f"## fedadapt vs Flower: framework overhead ({NUM_CLIENTS} clients, {NUM_ROUNDS} rounds, "
          "trivial MLP)\n")
    print(f"Command: `{exact_cmd}`  ")
    print(f"Machine: nproc={facts['nproc']}, {facts['cpu_model'] or 'cpu ?'}, "
          f"{facts['mem_total_gb']} GB RAM, Linux {facts['kernel']}  ")
    if av:
        print(f"fedadapt venv: python {av.get('python')}, torch {av.get('torch')}, "
              f"fedadapt {av.get('fedadapt')}  ")
    if fv:
        print(f"Flower venv: python {fv.get('python')}, torch {fv.get('torch')}, "
              f"flwr {fv.get('flwr')}, ray {fv.get('ray')}  ")
    print(f"Repeats: {args.repeats} measured (+{args.warmup} warm-up) per side; "
          f"RSS sampled every {args.interval} s, PSS every {args.pss_interval} s "
          "(and at new RSS peaks), summed over all processes of the run\n")
    for name, s in sides.items():
        if s.get("cmd"):
            print(f"- {name}: `{' '.join(shlex.quote(a) for a in s['cmd'])}`")
    print()
    print(table)
    print(f"\nRaw runs: {RESULTS_JSON}")
    noisy = [r for s in sides.values() for r in s.get("runs", [])
             if (r.get("background_cores") or 0) > IDLE_THRESHOLD]
    if noisy:
        print(f"\nWARNING: during {len(noisy)} run(s) other processes kept more than "
              f"{IDLE_THRESHOLD} cores busy ('other load' column): wall times are inflated. "
              "Re-run on a quiet machine.")
    failed = [r for s in sides.values() for r in s.get("runs", []) if not r["ok"]]
    if failed:
        print(f"\nWARNING: {len(failed)} run(s) failed; see 'problems' in the JSON.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
