"""Memory of the simulator as the number of virtual clients grows: 10 versus 200 clients.

Virtual clients share one frozen base model and swap only adapter state, so peak memory should
barely depend on how many clients exist. Each run is the quickstart scenario with the same number
of clients trained per round; only the client population differs. Peak RSS and PSS are summed over
the command's process tree, sampled every 0.1 s; medians of --repeats runs.

    .venv/bin/python benchmarks/memory_clients.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import REPO, command_line, measure_simulate, write_json  # noqa: E402


def run(num_clients: int, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        return measure_simulate(REPO / "simulations/quickstart.toml", out,
                                [f"data.num_clients={num_clients}", f"clients_per_round={args.per_round}",
                                 f"rounds={args.rounds}", "eval.every=1000", "eval.final_max_examples=64"],
                                failed=f"run with {num_clients} clients failed")


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
    print(f"command: {command_line(Path(sys.executable).name)}   (nproc={os.cpu_count()})")
    print(f"quickstart scenario, {args.per_round} clients trained per round, {args.rounds} rounds, "
          f"median of {args.repeats}\n")
    print("| virtual clients | peak RSS (MB) | peak PSS (MB) | wall (s) | RSS vs first |")
    print("|---|---|---|---|---|")
    for n, r in rows.items():
        pss = f"{r['pss_mb']:.0f}" if r["pss_mb"] is not None else "n/a"
        print(f"| {n} | {r['rss_mb']:.0f} | {pss} | {r['wall_s']:.1f} | {r['rss_mb'] / base['rss_mb']:.2f}x |")
    write_json(REPO / "benchmarks/results/memory_clients.json", {str(k): v for k, v in rows.items()})


if __name__ == "__main__":
    main()
