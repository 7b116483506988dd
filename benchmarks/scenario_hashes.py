"""Fingerprint the behaviour of `fedadapt simulate`: the sha256 of model.safetensors for every scenario in
simulations/ (and variants that reach privacy, attacks, FedAvgM, zero-padding, the median and the gRPC
transport), each shortened to 2 rounds. A refactoring that must not change results compares two runs:

    .venv/bin/python benchmarks/scenario_hashes.py --out benchmarks/results/hashes_before.json
    ... change the code ...
    .venv/bin/python benchmarks/scenario_hashes.py --out after.json --compare benchmarks/results/hashes_before.json

Every run uses --threads 1 (kernels pick their reduction order by thread count); `--jobs` runs that many at
once. Hashes compare only on the same machine, torch build and library versions.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, machine_facts, write_json

SHORT = ["rounds=2", "eval.final_max_examples=100", "eval.max_examples=64"]
# zo.toml's 200 SPSA steps for each of 16 MiniLM clients take half an hour even for 2 rounds
SHORTER = {"zo": ["clients_per_round=4", "strategy.steps=40"]}
# name -> (scenario file, extra overrides, extra CLI arguments)
VARIANTS: dict[str, tuple[str, list[str], list[str]]] = {
    "quickstart+client-dp": ("quickstart", ["privacy.dp='client'", "privacy.epsilon=8.0"], []),
    "quickstart+central-dp": ("quickstart", ["privacy.dp='central'", "privacy.epsilon=8.0"], []),
    "quickstart+secagg": ("quickstart", ["privacy.secure_aggregation=true"], []),
    "quickstart+fedavgm": ("quickstart", ["strategy.server_lr=0.5", "strategy.server_momentum=0.9"], []),
    "quickstart+median": ("quickstart", ["strategy={name='median'}"], []),
    "quickstart+sign-flip": ("quickstart", ["attack.kind='sign-flip'", "attack.fraction=0.2", "attack.scale=5.0"],
                             []),
    "quickstart+grpc": ("quickstart", [], ["--transport", "grpc"]),
    "flora+zeropad": ("flora", ["strategy={name='zeropad', ranks=[4, 8]}"], []),
    "fedsb+gradient-init+secagg": ("fedsb", ["strategy.init_upload='gradient'", "privacy.secure_aggregation=true"],
                                   []),
    "fedsb+client-dp": ("fedsb", ["strategy.init_upload='gradient'", "privacy.dp='client'", "privacy.epsilon=8.0"],
                        []),
    "ferret+client-dp": ("ferret", ["privacy.dp='client'", "privacy.epsilon=8.0"], []),
    "ferret+secagg": ("ferret", ["privacy.secure_aggregation=true"], []),
    "zo+pro+secagg": ("zo", ["strategy.pro=true", "privacy.secure_aggregation=true"], []),
    "fedau-digits+secagg": ("fedau-digits", ["privacy.secure_aggregation=true", "availability.absent='offline'"],
                            []),
    "frl-digits+secagg": ("frl-digits", ["privacy.secure_aggregation=true"], []),
    "frl-digits+client-dp": ("frl-digits", ["privacy.dp='client'", "privacy.epsilon=8.0"], []),
    "frl-digits+reverse-ranking": ("frl-digits", ["attack.kind='reverse-ranking'", "attack.fraction=0.2"], []),
}


def cases() -> dict[str, tuple[Path, list[str], list[str]]]:
    out = {p.stem: (p, SHORTER.get(p.stem, []), []) for p in sorted((REPO / "simulations").glob("*.toml"))}
    for name, (scenario, sets, args) in VARIANTS.items():
        out[name] = (REPO / "simulations" / f"{scenario}.toml", SHORTER.get(scenario, []) + sets, args)
    return out


def run_case(name: str, scenario: Path, sets: list[str], args: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="hashes-") as tmp:
        out = Path(tmp) / "run"
        cmd = [str(REPO / ".venv/bin/fedadapt"), "simulate", str(scenario), "--threads", "1", "--out", str(out),
               *[a for s in [*SHORT, *sets] for a in ("--set", s)], *args]
        start = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"name": name, "rc": -1, "error": f"timed out after {timeout:.0f}s", "seconds": timeout}
        seconds = time.perf_counter() - start
        model = out / "model.safetensors"
        if p.returncode != 0 or not model.is_file():
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            return {"name": name, "rc": p.returncode, "error": " | ".join(tail), "seconds": seconds}
        return {"name": name, "rc": 0, "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
                "seconds": round(seconds, 1), "command": " ".join(cmd[1:]).replace(str(out), "OUT")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file for the hashes")
    ap.add_argument("--compare", type=Path, help="an earlier --out file: print same/DIFFERENT per case")
    ap.add_argument("--only", nargs="*", help="case names to run (default: all); updates those in an existing --out")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args(argv)
    todo = {k: v for k, v in cases().items() if not args.only or k in args.only}
    earlier = json.loads(args.out.read_text())["cases"] if args.only and args.out.is_file() else {}
    results: dict[str, dict] = {}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_case, k, *v, args.timeout): k for k, v in todo.items()}
        for f in concurrent.futures.as_completed(futures):
            r = f.result()
            results[r["name"]] = r
            print(f"{r['name']:<30} {r.get('sha256', 'FAILED: ' + r.get('error', ''))}  ({r['seconds']:.0f}s)",
                  flush=True)
            # after every case, so that an interrupted run keeps what it measured; a partial rerun (--only)
            # updates those cases of an earlier file
            write_json(args.out, {"machine": machine_facts(), "threads": 1, "short": SHORT, "shorter": SHORTER,
                                  "cases": {**earlier, **{k: results[k] for k in todo if k in results}}})
    failed = [k for k, r in results.items() if r["rc"]]
    if args.compare:
        before = json.loads(args.compare.read_text())["cases"]
        print(f"\n{'case':<30} {'before':<14} {'after':<14} verdict")
        for k in todo:
            old = before.get(k, {}).get("sha256", "-")
            new = results[k].get("sha256", "-")
            print(f"{k:<30} {old[:12]:<14} {new[:12]:<14} {'same' if old == new else 'DIFFERENT'}")
            if old != new:
                failed.append(k)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
