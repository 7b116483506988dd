"""The `fedadapt` command. Errors a user can cause end in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import fedadapt
from fedadapt.core.errors import ConfigError, FedadaptError

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """Every command and its arguments (the server's and the client daemon's included)."""
    parser = argparse.ArgumentParser(prog="fedadapt", description="Federated fine-tuning of adapters.")
    parser.add_argument("--version", action="version", version=f"fedadapt {fedadapt.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a multi-client simulation on this machine")
    sim.add_argument("config", help="scenario TOML file, or a bundled scenario by name (quickstart, chat-tiny, "
                                    "...; see simulations/)")
    sim.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set rounds=2 --set train.lr=0.05")
    sim.add_argument("--out", type=Path, help="run directory (default: a fresh folder under runs/); must be new or "
                                              "empty unless --overwrite")
    sim.add_argument("--overwrite", action="store_true",
                     help="replace the run already in --out (its config, metrics, model, summary and plots)")
    sim.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    sim.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"),
                     help="where clients train and the server evaluates (overrides model.device)")
    sim.add_argument("--transport", choices=("inprocess", "grpc"), default="inprocess",
                     help="grpc: a real coordinator and virtual clients over gRPC on 127.0.0.1")

    data = sub.add_parser("data", help="fetch datasets and inspect how a scenario partitions them")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    data_sub.add_parser("fetch", help="download the Shakespeare corpus into the cache (once)")
    info = data_sub.add_parser("info", help="dataset and per-client partition statistics of a scenario")
    info.add_argument("config")
    info.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    report = sub.add_parser("report", help="plot a run's metrics.jsonl to curves.png")
    report.add_argument("run_dir", type=Path)

    export = sub.add_parser("export", help="write a run's global model as a peft adapter or a merged model folder",
                            description="Write a run's global model as a standard peft LoRA adapter (--format peft: "
                                        "adapter_config.json, adapter_model.safetensors, the tokenizer) or as the "
                                        "base model with the adapter merged in (--format merged), loadable by "
                                        "transformers and peft alone.",
                            epilog="example: fedadapt export runs/chat-tiny-20261207-101500 --format peft --out "
                                   "my-adapter")
    export.add_argument("run_dir", type=Path, help="a run directory (config.toml and model.safetensors)")
    export.add_argument("--format", choices=("peft", "merged"), default="peft",
                        help="peft: an adapter for the base model (default); merged: a full model folder")
    export.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist or be empty)")
    export.add_argument("--model", help="the base model folder on this machine (default: the run's [model] source; "
                                        "for a run downloaded from a coordinator whose path differs)")

    from fedadapt.client import cli as client_cli
    from fedadapt.server import cli as server_cli

    server_cli.add_parsers(sub)
    client_cli.add_parsers(sub)

    _add_examples(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fedadapt.client import cli as client_cli
    from fedadapt.server import cli as server_cli

    args = build_parser().parse_args(argv)
    try:
        if args.command in ("server", "certs", "clients", "run"):
            _quiet_libraries()
            return server_cli.dispatch(args)
        if args.command == "client":
            _quiet_libraries()
            return client_cli.dispatch(args)
        return _dispatch(args)
    except server_cli.Unavailable as exc:
        print(f"fedadapt: error: {exc}", file=sys.stderr)
        return server_cli.EXIT_UNAVAILABLE
    except FedadaptError as exc:
        print(f"fedadapt: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("fedadapt: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a path the user gave that cannot be read or written: one line, not a traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"fedadapt: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USER_ERROR


def _dispatch(args: argparse.Namespace) -> int:
    from fedadapt.core.config import load_config

    if args.command == "simulate":
        if args.threads < 0:
            raise ConfigError(f"--threads must be 0 (all cores) or a positive count, got {args.threads}")
        if args.out is not None:
            _fresh_run_dir(args.out, args.overwrite)
        cfg = load_config(args.config, args.overrides + ([f'model.device="{args.device}"'] if args.device else []))
        _quiet_libraries()
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        from fedadapt.simulation.runner import default_out_dir, in_process, simulate

        if args.transport == "grpc":
            from fedadapt.loopback import grpc_transport as transport
        else:
            transport = in_process
        simulate(cfg, args.out or default_out_dir(cfg), transport=transport)
        return 0
    if args.command == "data":
        _quiet_libraries()
        if args.data_command == "fetch":
            from fedadapt.data.shakespeare import load_shakespeare_genre

            task = load_shakespeare_genre()
            print(f"shakespeare-genre: {len(task.train)} train, {len(task.test)} test, "
                  f"{len(task.test_unseen or [])} unseen-role examples")
            return 0
        from fedadapt.simulation.info import print_info

        print_info(load_config(args.config, args.overrides))
        return 0
    if args.command == "report":
        from fedadapt.simulation.report import plot_run

        print(plot_run(args.run_dir))
        return 0
    if args.command == "export":
        from fedadapt.export import export

        print(f"{args.format} model written to {export(args.run_dir, args.format, args.out, args.model)}")
        return 0
    raise AssertionError(args.command)


def _quiet_libraries() -> None:
    """Offline by design: no hub calls, no telemetry, no progress bars from libraries we drive."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft calls a transformers API that transformers itself marks deprecated: not the user's concern
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")


EXAMPLES = {  # one per command, shown at the end of its --help
    "simulate": "fedadapt simulate quickstart --set rounds=5 --set train.lr=0.1 --out runs/try",
    "data fetch": "fedadapt data fetch",
    "data info": "fedadapt data info quickstart --set data.partition=dirichlet --set data.num_clients=50",
    "report": "fedadapt report runs/try",
    "server start": "fedadapt server start --tls-dir certs --database fedadapt.db",
    "certs init": "fedadapt certs init certs --hosts coord.example.org,127.0.0.1",
    "clients add": "fedadapt clients add alice --database fedadapt.db --tls-dir certs",
    "clients list": "fedadapt clients list --database fedadapt.db --format json",
    "clients revoke": "fedadapt clients revoke alice --database fedadapt.db",
    "run submit": "fedadapt run submit simulations/grpc-demo.toml --follow --credentials certs/admin",
    "run list": "fedadapt run list --format json --credentials certs/admin",
    "run get": "fedadapt run get RUN_ID --credentials certs/admin",
    "run follow": "fedadapt run follow RUN_ID --credentials certs/admin",
    "run stop": "fedadapt run stop RUN_ID --credentials certs/admin",
    "run resume": "fedadapt run resume RUN_ID --credentials certs/admin",
    "run download": "fedadapt run download RUN_ID --out runs/mine --credentials certs/admin",
    "client start": "fedadapt client start --coordinator coord.example.org:7070 --credentials alice/ --data "
                    "alice.jsonl",
}


def _add_examples(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> None:
    """Every command's --help ends with an example (from EXAMPLES, unless the command wrote its own)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                key = " ".join((*path, name))
                if not sub.epilog and key in EXAMPLES:
                    sub.epilog = f"example: {EXAMPLES[key]}"
                _add_examples(sub, (*path, name))


RUN_FILES = ("config.toml", "metrics.jsonl", "model.safetensors", "summary.json", "curves.png", "generations.jsonl")


def _fresh_run_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before anything loads, an --out that would mix two runs: a file, or a folder with something in it
    (with --overwrite, a run's own files are removed first; any other folder is left alone)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / "config.toml").is_file():
        raise ConfigError(f"--out {out} is a folder with other files in it, not a run directory: give a new folder")
    if not overwrite:
        raise ConfigError(f"--out {out} already holds a run: give a new folder, or --overwrite to replace that run")
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
