"""Memory of the simulator as the number of virtual clients grows: 10 versus 200 clients.

Virtual clients share one frozen base model and swap only adapter state, so peak memory should
barely depend on how many clients exist. Each run is the quickstart scenario with the same number
of clients trained per round; only the client population differs. Peak RSS and PSS are summed over
the command's process tree, sampled every 0.1 s; medians of --repeats runs.

    .venv/bin/python benchmarks/memory_clients.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import measure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FEDADAPT = Path(sys.executable).parent / "fedadapt"


def run(num_clients: int, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(FEDADAPT), "simulate", str(ROOT / "simulations/quickstart.toml"), "--out", out,
               "--set", f"data.num_clients={num_clients}", "--set", f"clients_per_round={args.per_round}",
               "--set", f"rounds={args.rounds}", "--set", "eval.every=1000", "--set", "eval.final_max_examples=64"]
        r = measure(cmd, env={**os.environ}, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if r["rc"] != 0:
            sys.exit(f"run with {num_clients} clients failed (exit {r['rc']}): {' '.join(cmd)}")
        return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 200])
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows = {}
    for n in args.clients:
        runs = [run(n, args) for _ in range(args.repeats)]
        rows[n] = {"runs": runs,
                   "rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
                   "pss_mb": statistics.median(r["peak_pss_mb"] for r in runs if r["peak_pss_mb"] is not None)
                   if all(r["peak_pss_mb"] is not None for r in runs) else None,
                   "wall_s": statistics.median(r["wall_s"] for r in runs)}
    base = rows[args.clients[0]]
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}   (nproc={os.cpu_count()})")
    print(f"quickstart scenario, {args.per_round} clients trained per round, {args.rounds} rounds, "
          f"median of {args.repeats}\n")
    print("| virtual clients | peak RSS (MB) | peak PSS (MB) | wall (s) | RSS vs first |")
    print("|---|---|---|---|---|")
    for n, r in rows.items():
        pss = f"{r['pss_mb']:.0f}" if r["pss_mb"] is not None else "n/a"
        print(f"| {n} | {r['rss_mb']:.0f} | {pss} | {r['wall_s']:.1f} | {r['rss_mb'] / base['rss_mb']:.2f}x |")
    out = ROOT / "benchmarks/results/memory_clients.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({str(k): v for k, v in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
