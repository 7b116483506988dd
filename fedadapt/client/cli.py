"""`fedadapt client start`: a client daemon for an edge machine (exit codes as in server/cli.py)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from fedadapt.core.errors import ConfigError


def add_parsers(sub) -> None:
    client = sub.add_parser("client", help="run a client daemon").add_subparsers(dest="action", required=True)
    start = client.add_parser("start", help="join a coordinator and train when asked, until interrupted")
    start.add_argument("--coordinator", default=os.environ.get("FEDADAPT_COORDINATOR", "127.0.0.1:7070"),
                       help="HOST:PORT of the coordinator (default: $FEDADAPT_COORDINATOR or 127.0.0.1:7070)")
    start.add_argument("--name", help="this client's registered name (default: the credentials dir's name file)")
    start.add_argument("--credentials", type=Path, required=True,
                       help="folder with name, token and ca.crt (from `fedadapt clients add`)")
    start.add_argument("--insecure", action="store_true", help="plain-text connection (coordinator --insecure)")
    data = start.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", type=Path, help="this machine's examples: a .jsonl or .csv file (a causal-lm run: "
                                                "a .jsonl of conversations)")
    data.add_argument("--partition", help="demo/test: train on partition ID of the run's own bundled dataset")
    start.add_argument("--model", help="where the run's base model is on this machine (HF directory)")
    start.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"),
                       help="where this machine trains (overrides the run's model.device)")
    start.add_argument("--state-dir", type=Path,
                       help="where this client keeps its privacy ledger and secure-aggregation key "
                            "(default: the credentials folder)")
    start.add_argument("--max-epsilon", type=float,
                       help="this client's own privacy budget over all runs: it then trains only under client DP "
                            "and refuses any task that would take its total epsilon past this")
    start.add_argument("--max-payload-mb", type=int, default=256, help="largest task accepted (default 256)")
    start.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    start.add_argument("--max-lora-rank", type=int, default=0,
                       help="the largest LoRA rank this machine trains (FLoRA, zeropad: caps the run's rank)")


def dispatch(args: argparse.Namespace) -> int:
    import torch

    from fedadapt.client.agent import ClientAgent
    from fedadapt.client.workload import build_workload
    from fedadapt.core.memory import reuse_freed_memory
    from fedadapt.proto.auth import load_credentials

    reuse_freed_memory()
    if args.data is not None and not args.data.is_file():
        raise ConfigError(f"data file {args.data} does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    creds = load_credentials(args.credentials, args.name)

    log = lambda msg: print(f"[{creds.name}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if args.max_epsilon is not None and not args.max_epsilon > 0:
        raise ConfigError(f"--max-epsilon must be > 0, got {args.max_epsilon}")
    state, capabilities = _privacy_state(args.state_dir or args.credentials, log, args.max_epsilon)

    def make_workload(spec):
        return build_workload(spec, partition=args.partition, data_file=args.data, model_source=args.model,
                              device=args.device, state=state)

    if args.max_lora_rank > 0:
        capabilities["max_lora_rank"] = args.max_lora_rank
    agent = ClientAgent(args.coordinator, creds, make_workload, insecure=args.insecure, capabilities=capabilities,
                        max_payload_bytes=args.max_payload_mb * 1024 * 1024,
                        log=log)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=agent.stop, daemon=True).start())
    agent.run()
    return 0


def _privacy_state(folder: Path, log, max_epsilon: float | None = None):
    """This client's privacy state and the capability it declares at Join (its secure-aggregation public key).
    A read-only folder (e.g. credentials mounted read-only) still serves runs without client-side privacy."""
    from fedadapt.client.state import ClientState
    from fedadapt.privacy import secagg

    state = ClientState(folder, max_epsilon)
    try:
        return state, {"secagg_key": secagg.public_hex(state.secagg_key())}
    except OSError as exc:
        if max_epsilon is not None:  # a cap needs its ledger: without one, refusing to start is the safe answer
            raise ConfigError(f"--max-epsilon needs a writable state folder for the ledger; {folder}: "
                              f"{exc.strerror or exc} (pass --state-dir DIR)") from None
        log(f"cannot keep privacy state in {folder} ({exc.strerror or exc}); runs with client DP or secure "
            "aggregation need a writable --state-dir")
        return None, {}
