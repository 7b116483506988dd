#!/usr/bin/env python3
"""One scenario, three runtimes: fedadapt's simulator vs Flower 1.42's simulation runtime, side by side.

Scenario: benchmarks/flower_sim.toml -- FLoRA (ranks 4/8/16), 100 virtual clients, 10 per round, 5 rounds,
tiny Llama, Shakespeare genre task (IID). The same fedadapt strategy and recipe code runs in every side:
on Flower through fedadapt.flower (FedadaptStrategy + ClientApp), so what differs is the runtime.

Sides (each: the whole command, cold process start to exit; memory summed over all its processes,
RSS every 0.1 s and PSS every 0.5 s, with benchmarks/measure.py; processes found by an env tag, which Ray's
and the detached SuperLink's processes inherit):

* fedadapt        `.venv/bin/fedadapt simulate benchmarks/flower_sim.toml`
* flower-pyapi    `python -m fedadapt.flower.simulate benchmarks/flower_sim.toml` in the Flower venv
                  (flwr.simulation.run_simulation: ServerApp in-process, ClientApps in one Ray actor)
* flower-cli      `flwr run examples/flower local --stream --federation-config num-supernodes=100`
                  (the local SuperLink + SuperExec + flwr-simulation + Ray; a fresh FLWR_HOME, a cold
                  SuperLink; skipped if someone else's local SuperLink is already up on its fixed port)

Each side also checks its final adapter against the fedadapt side's (bit-identical expected).

Usage (repo root; runs one side per call if you like, merging into the same JSON):

    nice -n 10 .venv/bin/python benchmarks/flower_sim.py [--sides fedadapt,flower-pyapi,flower-cli] [--repeats 1]

Writes benchmarks/results/flower_sim.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead_vs_flower as ovf  # noqa: E402  (the env tag, the local SuperLink, quiet waits, machine facts)
from flower_env import OVERLAY_VAR, flower_python, flwr_ls  # noqa: E402
from harness import BENCH_DIR, REPO, RESULTS, command_line, kill_processes, log, record_problems, utc_now, write_json  # noqa: E402
from measure import measure, summarize  # noqa: E402

SCENARIO = BENCH_DIR / "flower_sim.toml"
EXAMPLE_APP = REPO / "examples" / "flower"
RESULTS_JSON = RESULTS / "flower_sim.json"
SIDES = ("fedadapt", "flower-pyapi", "flower-cli")
NUM_CLIENTS = 100


def _side_cmd(side: str, out: Path, py: Path) -> list[str]:
    if side == "fedadapt":
        return [str(ovf.FEDADAPT_BIN), "simulate", str(SCENARIO), "--out", str(out)]
    if side == "flower-pyapi":
        return [str(py), "-m", "fedadapt.flower.simulate", str(SCENARIO), "--out", str(out)]
    return [str(py.parent / "flwr"), "run", str(EXAMPLE_APP), "local", "--stream",
            "--federation-config", f"num-supernodes={NUM_CLIENTS}",
            "-c", f"scenario='{SCENARIO}' out-dir='{out}'"]


def _env(side: str, work: Path, tag: str, overlay_env: dict[str, str]) -> dict[str, str]:
    if side == "fedadapt":
        return {**os.environ, ovf.TAG_KEY: tag}
    env = ovf.flower_run_env(work, tag)  # Flower venv first on PATH, fresh FLWR_HOME, RAY_TMPDIR, offline flags
    env[OVERLAY_VAR] = overlay_env[OVERLAY_VAR]  # ... and this checkout of fedadapt importable
    (work / "ray").mkdir(parents=True, exist_ok=True)
    return env


def run_once(side: str, work: Path, timeout: float, py: Path, overlay_env: dict[str, str]) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    out, tag = work / "out", uuid.uuid4().hex
    env = _env(side, work, tag, overlay_env)
    cmd = _side_cmd(side, out, py)
    with open(work / "run.log", "wb") as lf:
        res = measure(cmd, env=env, match_env=(ovf.TAG_KEY, tag), cwd=str(REPO), timeout=timeout,
                      stdout=lf, stderr=subprocess.STDOUT)
    res["cmd"] = cmd
    problems = [f"exited {res['rc']}"] if res["rc"] != 0 else []
    if side == "flower-cli":  # `flwr run --stream` exits 0 even when the run failed (FLOWER-NOTES P5)
        runs = flwr_ls(env, "local").get("runs") or []
        res["flwr_ls_status"] = [r.get("status") for r in runs]
        if res["flwr_ls_status"] != ["finished:completed"]:
            problems.append(f"flwr ls: {res['flwr_ls_status']}")
    summary = out / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        res.update(train_s=s.get("train_seconds"), accuracy=s.get("accuracy"))
    else:
        problems.append("no summary.json (the run did not finish)")
    # everything this run started, including a detached SuperLink/SuperExec and Ray, carries the tag
    res["adapter_sha256"] = adapter_digest(out / "model.safetensors")
    stray = kill_processes(ovf.tagged_processes(tag))
    if stray:
        res["killed_after"] = stray
    return record_problems(res, problems, side, work / "run.log")


def adapter_digest(path: Path) -> str | None:
    """sha256 over the final adapter's tensors (names, dtypes, shapes, bytes): equal digests = bit-identical."""
    if not path.is_file():
        return None
    import hashlib

    import torch
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for k, t in sorted(load_file(path).items()):
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def render(sides: dict) -> str:
    rows = ["| runtime | ok runs | wall median (s) | training rounds (s) | peak RSS (MB) | peak PSS (MB) "
            "| CPU (s) | other load (cores) | final adapter = fedadapt's |",
            "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, nd=1: "n/a" if v is None else f"{v:.{nd}f}"  # noqa: E731
    for name, s in sides.items():
        if s.get("skipped"):
            rows.append(f"| {name} | skipped: {s['skipped']} | | | | | | | |")
            continue
        sm = s["summary"]
        fa = sides.get("fedadapt", {}).get("runs", [{}])[0].get("adapter_sha256")
        mine = {r.get("adapter_sha256") for r in s["runs"]}
        same = ("(reference)" if name == "fedadapt" else "n/a" if fa is None or None in mine
                else "bit-identical" if mine == {fa} else "differs")
        rows.append(f"| {name} | {sm['wall_s']['n']}/{len(s['runs'])} | {f(sm['wall_s']['median'])} | "
                    f"{f(sm['train_s']['median'])} | {f(sm['peak_rss_mb']['median'], 0)} | "
                    f"{f(sm['peak_pss_mb']['median'], 0)} | {f(sm['cpu_s']['median'])} | "
                    f"{f(sm['background_cores']['max'], 2)} | {same} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(SIDES)}")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600, help="per-run timeout (s)")
    ap.add_argument("--idle-wait", type=float, default=30, help="wait up to this long for a quiet machine")
    ap.add_argument("--fresh", action="store_true", help="drop earlier sides from the JSON instead of merging")
    args = ap.parse_args(argv)
    chosen = [s.strip() for s in args.sides.split(",") if s.strip()]
    if unknown := set(chosen) - set(SIDES):
        ap.error(f"unknown sides {sorted(unknown)}")

    py, overlay_env = flower_python()
    old = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.is_file() and not args.fresh else {}
    sides: dict = old.get("sides", {})
    work = Path(tempfile.mkdtemp(prefix="fsim-"))  # short: Ray's socket paths live under RAY_TMPDIR
    ovf.IDLE_WAIT_S = args.idle_wait
    try:
        for side in SIDES:
            if side not in chosen:
                continue
            if side == "flower-cli" and ovf.local_superlinks():
                sides[side] = {"skipped": "a local SuperLink (port 39091) of someone else was running"}
                log(f"[{side}] skipped: {sides[side]['skipped']}")
                continue
            runs = []
            for i in range(args.repeats):
                quiet = ovf.wait_for_quiet(side)
                log(f"[{side}] run {i + 1}/{args.repeats} ...")
                r = run_once(side, work / f"{side}-{i}", args.timeout, py, overlay_env)
                r.update(quiet)
                log(f"[{side}] ok={r['ok']} wall={r['wall_s']:.1f}s train={r.get('train_s')} "
                    f"peakRSS={r['peak_rss_mb']:.0f}MB background={r['background_cores']} cores")
                runs.append(r)
            ok = [r for r in runs if r["ok"]]
            entry = {"runs": runs, "cmd": runs[0]["cmd"],
                     "summary": summarize(ok, ("wall_s", "train_s", "peak_rss_mb", "peak_pss_mb", "cpu_s",
                                               "background_cores"))}
            sides[side] = entry
    finally:
        shutil.rmtree(work, ignore_errors=True)  # run_once already ended every process it tagged

    data = {"benchmark": "flower_sim", "updated_utc": utc_now(), "command": command_line(),
            "scenario": SCENARIO.read_text(), "repeats": args.repeats,
            "machine": ovf.machine_facts(flower=True, fedadapt=True), "sides": sides}
    write_json(RESULTS_JSON, data)
    print(render(sides))
    print(f"\nRaw runs: {RESULTS_JSON}")
    return 0 if all(r["ok"] for s in sides.values() for r in s.get("runs", [])) else 1


if __name__ == "__main__":
    sys.exit(main())
