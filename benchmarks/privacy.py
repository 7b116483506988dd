"""Privacy: accuracy versus epsilon for FedAvg-LoRA and Fed-SB under client DP-SGD, and the cost of
secure aggregation per round, on the quickstart task (Shakespeare genre, MiniLM, one client per role).

Accuracy: each strategy's shipped scenario (simulations/quickstart.toml, simulations/fedsb.toml) with
fewer rounds, under privacy.dp = "client" at each epsilon (per client, delta 1e-5; noise calibrated by
opacus for `--planned-rounds` participations of a client; a client picked more often refuses past its
budget). epsilon = inf is the same run without DP. Nothing is tuned for DP (same lr, clip --clip).

Secure aggregation: the same FedAvg scenario with and without privacy.secure_aggregation (seconds per
round, upload bytes), and the masking and unmasking time alone for the quickstart adapter's size.
With --secagg-strategies: every strategy wired to secure aggregation, on its shipped scenario, a few rounds
plain and masked (upload bytes per client, seconds per round, largest difference of the final models).

    nice -n 10 .venv/bin/python benchmarks/privacy.py            # writes benchmarks/results/privacy.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, simulate_cmd, write_json

SCENARIOS = {"fedavg": "simulations/quickstart.toml", "fedsb": "simulations/fedsb.toml"}
# uploaded numbers per client: LoRA r=8 on query/value of 6 layers + head; Fed-SB r=16 cores + head
QUICKSTART_PARAMS = {"fedavg": 12 * 2 * 8 * 384 + 3 * 384 + 3, "fedsb": 12 * 16 * 16 + 3 * 384 + 3}


def run_simulate(scenario: str, out: str, overrides: list[str]) -> None:
    """`fedadapt simulate` of a scenario of this repository into `out`; a failure ends the benchmark."""
    cmd = simulate_cmd(REPO / scenario, out, overrides)
    r = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed (exit {r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")


def simulate(scenario: str, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        run_simulate(scenario, out, overrides)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((Path(out) / "summary.json").read_text())
    refused = sum(1 for row in rows for p in row["per_client"].values() if "privacy budget" in p["reason"])
    eps = [row["strategy"].get("privacy/epsilon_max") for row in rows if "privacy/epsilon_max" in row["strategy"]]
    return {"accuracy": summary["accuracy"], "accuracy_unseen": summary.get("accuracy_unseen"),
            "majority_baseline": summary["majority_baseline"],
            "majority_baseline_unseen": summary.get("majority_baseline_unseen"), "wall_s": time.perf_counter() - t0,
            "round_seconds": [row["seconds"] for row in rows], "bytes_up": [row["bytes_up"] for row in rows],
            "clients_per_round": [len(row["clients"]) for row in rows], "refused_budget": refused,
            "epsilon_max_spent": eps[-1] if eps else None, "overrides": overrides}


# strategy -> (its shipped scenario, overrides that keep a short run short or make it maskable)
SECAGG_SCENARIOS = {
    "fedavg": ("simulations/quickstart.toml", []),
    "fedsb": ("simulations/fedsb.toml", ["strategy.init_upload=gradient", "strategy.init_clients=2"]),
    "fedau": ("simulations/fedau-digits.toml", ["availability.absent=offline"]),  # everyone asked, ~10 answer
    "ferret": ("simulations/ferret.toml", []),
    "zo": ("simulations/zo.toml", ["strategy.steps=20"]),
    "frl": ("simulations/frl-digits.toml", []),
}


def secagg_pair(name: str, rounds: int, clients: int) -> dict:
    """`name`'s scenario for `rounds` rounds, plain and masked: bytes, seconds, and how far the models differ."""
    from safetensors.torch import load_file

    scenario, extra = SECAGG_SCENARIOS[name]
    common = [f"rounds={rounds}", "eval.every=1000", "eval.final_max_examples=200", *extra]
    if name != "fedau":
        common.append(f"clients_per_round={clients}")
    out, models = {}, {}
    for on in (False, True):
        with tempfile.TemporaryDirectory() as d:
            run_simulate(scenario, d, [*common, f"privacy.secure_aggregation={str(on).lower()}"])
            rows = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
            models[on] = load_file(Path(d) / "model.safetensors")
            acc = json.loads((Path(d) / "summary.json").read_text())["accuracy"]
        out["masked" if on else "plain"] = {
            "bytes_up_per_client": statistics.median(r["bytes_up"] / max(len(r["clients"]), 1) for r in rows),
            "seconds_per_round": statistics.median(r["seconds"] for r in rows[1:] or rows),
            "clients_per_round": statistics.median(len(r["clients"]) for r in rows),
            "discarded": sum("secagg_discarded" in r["strategy"] for r in rows), "accuracy": acc}
    out["max_model_difference"] = max(float((models[True][k].double() - v.double()).abs().max())
                                      for k, v in models[False].items())
    return out


def masking_cost(num_params: int, clients: int, repeat: int = 3) -> dict:
    """Seconds to mask one client's upload (clients - 1 pairwise streams) and to unmask the round's sum."""
    import torch

    from fedadapt.privacy import secagg

    keys = {f"c{i:03d}": secagg.new_key(bytes([i + 1]) * 32) for i in range(clients)}
    peers = {c: secagg.public_hex(k) for c, k in keys.items()}
    x = {"w": torch.randn(num_params)}
    mask_s, ups = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        up = secagg.mask(x, 1.0, me="c000", key=keys["c000"], peers=peers, rnd=1, salt=b"bench", frac_bits=24)
        mask_s.append(time.perf_counter() - t)
    ups = [up] * clients
    t = time.perf_counter()
    secagg.unmask_sum(ups, 24)
    return {"params": num_params, "clients": clients, "mask_s_per_client": statistics.median(mask_s),
            "unmask_s_per_round": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--clients-per-round", type=int, default=8)
    ap.add_argument("--final-examples", type=int, default=300)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0, math.inf])
    ap.add_argument("--strategies", nargs="+", default=["fedavg", "fedsb"], choices=sorted(SCENARIOS))
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--planned-rounds", type=int, default=2)
    ap.add_argument("--secagg-rounds", type=int, default=4)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-secagg", action="store_true")
    ap.add_argument("--secagg-micro-only", action="store_true")
    ap.add_argument("--secagg-strategies", nargs="+", choices=sorted(SECAGG_SCENARIOS),
                    help="plain vs masked runs of these strategies' shipped scenarios (--secagg-rounds rounds)")
    ap.add_argument("--out", default="benchmarks/results/privacy.json")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every accuracy run (e.g. strategy.init_upload=gradient)")
    args = ap.parse_args()
    out = REPO / args.out
    results = json.loads(out.read_text()) if out.is_file() else {}
    common = [f"rounds={args.rounds}", f"clients_per_round={args.clients_per_round}", "eval.every=1000",
              f"eval.final_max_examples={args.final_examples}"]
    if not args.skip_accuracy:
        acc = results.setdefault("accuracy", {})
        for name in args.strategies:
            for eps in args.epsilons:
                dp = [] if math.isinf(eps) else ["privacy.dp=client", f"privacy.epsilon={eps}",
                                                 f"privacy.max_grad_norm={args.clip}",
                                                 f"privacy.planned_rounds={args.planned_rounds}"]
                row = simulate(SCENARIOS[name], common + dp + args.extra)
                acc.setdefault(name, {})[str(eps)] = row
                print(f"{name} epsilon {eps}: accuracy {row['accuracy']:.3f} (unseen {row['accuracy_unseen']:.3f}), "
                      f"spent {row['epsilon_max_spent']}, refused {row['refused_budget']}, {row['wall_s']:.0f}s",
                      flush=True)
                write_json(out, {**results, "args": vars(args)})
    if args.skip_secagg:
        return
    if args.secagg_strategies:
        pairs = results.setdefault("secure_aggregation_strategies", {})
        for name in args.secagg_strategies:
            pairs[name] = p = secagg_pair(name, args.secagg_rounds, args.clients_per_round)
            print(f"{name}: upload per client {p['plain']['bytes_up_per_client'] / 1e3:.1f} kB -> "
                  f"{p['masked']['bytes_up_per_client'] / 1e3:.1f} kB masked, "
                  f"{p['plain']['seconds_per_round']:.2f} -> {p['masked']['seconds_per_round']:.2f} s/round, "
                  f"largest model difference {p['max_model_difference']:.2e}", flush=True)
            results["nproc"] = os.cpu_count()
            write_json(out, results)
        return
    if args.secagg_micro_only:  # masking cost alone, for both adapters of the quickstart task
        micro = [masking_cost(n, k) for n in (QUICKSTART_PARAMS["fedavg"], QUICKSTART_PARAMS["fedsb"])
                 for k in (8, 16, 64)]
        for m in micro:
            print(f"{m['params']} parameters, {m['clients']} clients: mask {m['mask_s_per_client'] * 1e3:.1f} ms per "
                  f"client, unmask {m['unmask_s_per_round'] * 1e3:.1f} ms per round", flush=True)
        results["secure_aggregation_micro"] = micro
        results["nproc"] = os.cpu_count()
        write_json(out, results)
        return
    sa = {}
    for on in (False, True):
        sa["masked" if on else "plain"] = simulate(SCENARIOS["fedavg"], [
            f"rounds={args.secagg_rounds}", f"clients_per_round={args.clients_per_round}", "eval.every=1000",
            f"eval.final_max_examples={args.final_examples}",
            f"privacy.secure_aggregation={'true' if on else 'false'}"])
    from safetensors.torch import load_file  # the adapter size of the quickstart

    with tempfile.TemporaryDirectory() as d:
        run_simulate(SCENARIOS["fedavg"], d, ["rounds=1", "clients_per_round=1", "eval.final_max_examples=10"])
        params = sum(t.numel() for t in load_file(Path(d) / "model.safetensors").values())
    sa["micro"] = masking_cost(params, args.clients_per_round)
    results["secure_aggregation"] = sa
    later = lambda r: statistics.median(r["round_seconds"][1:])  # noqa: E731  round 1 includes warm-up
    print(f"secure aggregation, {args.clients_per_round} clients/round: plain {later(sa['plain']):.2f}s/round, "
          f"masked {later(sa['masked']):.2f}s/round; upload {sa['plain']['bytes_up'][-1]} -> "
          f"{sa['masked']['bytes_up'][-1]} bytes/round; mask {sa['micro']['mask_s_per_client'] * 1e3:.1f} ms/client, "
          f"unmask {sa['micro']['unmask_s_per_round'] * 1e3:.1f} ms/round ({params} parameters)")
    results["args"] = vars(args)
    results["nproc"] = os.cpu_count()
    write_json(out, results)


if __name__ == "__main__":
    main()
