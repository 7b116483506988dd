"""Run a fedadapt scenario on Flower's simulation runtime (`flwr.simulation.run_simulation`, Ray backend).

    python -m fedadapt.flower.simulate SCENARIO.toml [--set k=v ...] [--out DIR] [--cpus-per-client 2]

One SuperNode per client of the scenario. The output directory gets what `fedadapt simulate` writes
(model.safetensors, metrics.jsonl, summary.json), so the two runs compare file by file.
`flwr run examples/flower` is the CLI way to the same runtime.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .app import load_run, make_client_app, make_server_app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--out", type=Path, help="write model.safetensors, metrics.jsonl, summary.json here")
    ap.add_argument("--cpus-per-client", type=float, default=2.0,
                    help="Ray CPUs per virtual client (2 on a 2-core machine: one actor, the fastest setting)")
    ap.add_argument("--fraction-evaluate", type=float, default=0.0)
    args = ap.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.simulation import run_simulation  # after the environment: Flower reads it on import

    scenario = str(Path(args.scenario).resolve())
    run = load_run({}, scenario, args.set)  # cached: the ServerApp, run in this process, reuses it
    defaults = {"fraction-evaluate": args.fraction_evaluate}
    if args.out:
        defaults["out-dir"] = str(args.out.resolve())
    run_simulation(server_app=make_server_app(scenario, args.set, **defaults),
                   client_app=make_client_app(scenario, args.set), num_supernodes=len(run.clients),
                   backend_config={"client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0}})
    if args.out and not (args.out / "model.safetensors").is_file():
        print("Flower run ended without a final model (see the log above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
