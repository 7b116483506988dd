"""`fedadapt server|certs|clients|run ...`: run a coordinator, manage its credentials and client
registry, and submit and watch runs through its Control service.

Exit codes (all commands): 0 success; 2 a user error (bad config, refused credential, unknown run),
one line on stderr; 3 the coordinator cannot be reached; 4 a followed run failed; 5 a followed run
was stopped; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from fedadapt.core.errors import ConfigError, FedadaptError

EXIT_UNAVAILABLE, EXIT_RUN_FAILED, EXIT_RUN_STOPPED = 3, 4, 5
DEFAULT_ADDRESS = "127.0.0.1:7070"


class Unavailable(FedadaptError):
    """The coordinator cannot be reached (exit code 3)."""


def add_parsers(sub) -> None:
    db = dict(default=os.environ.get("FEDADAPT_DATABASE", "fedadapt.db"),
              help="SQLAlchemy URL or SQLite file (default: $FEDADAPT_DATABASE or fedadapt.db)")

    server = sub.add_parser("server", help="run a coordinator").add_subparsers(dest="action", required=True)
    start = server.add_parser("start", help="serve clients and runs until interrupted")
    start.add_argument("--database", **db)
    start.add_argument("--address", default=DEFAULT_ADDRESS, help=f"HOST:PORT to listen on (default {DEFAULT_ADDRESS})")
    tls = start.add_mutually_exclusive_group(required=True)
    tls.add_argument("--tls-dir", type=Path, help="folder made by `fedadapt certs init` (server.crt, server.key, admin/)")
    tls.add_argument("--insecure", action="store_true", help="no TLS and an open Control service (loopback only)")
    start.add_argument("--data-dir", type=Path, help="tensor blobs (default: next to a SQLite database, DB.blobs/)")
    start.add_argument("--max-payload-mb", type=int, default=256, help="largest upload accepted (default 256)")
    start.add_argument("--metrics-port", type=int, default=0,
                       help="serve Prometheus metrics on this port (default: off); see --metrics-address")
    start.add_argument("--metrics-address", default="127.0.0.1", help="address of the metrics endpoint (default 127.0.0.1)")
    start.add_argument("--straggler-factor", type=float, default=3.0,
                       help="once coordinator.min_results clients of a round answered, the others get this many times "
                            "their median answer time (default 3; 0: wait for every connected client)")
    start.add_argument("--straggler-min-s", type=float, default=30.0,
                       help="the stragglers' grace is never shorter than this (default 30 seconds)")
    start.add_argument("--max-uploads", type=int, default=1024, help="uploads in flight at once (default 1024)")
    start.add_argument("--upload-buffer-mb", type=int, default=2048,
                       help="payload bytes of uploads in flight, in all (default 2048)")
    start.add_argument("--max-connections", type=int, default=4096,
                       help="open connections at once; gRPC refuses more before their handshake (default 4096)")
    start.add_argument("--upload-idle-s", type=float, default=30.0,
                       help="the longest wait for the next part of an upload (default 30)")

    certs = sub.add_parser("certs", help="make TLS certificates and credentials").add_subparsers(dest="action", required=True)
    init = certs.add_parser("init", help="a CA, a server certificate, admin and per-client credentials")
    init.add_argument("dir", type=Path)
    init.add_argument("--hosts", default="localhost,127.0.0.1", help="names clients use to reach the server")
    init.add_argument("--clients", default="", help="client names to issue credentials for, comma-separated")
    init.add_argument("--force", action="store_true", help="replace an existing CA (invalidates every certificate)")

    clients = sub.add_parser("clients", help="the coordinator's client registry").add_subparsers(dest="action", required=True)
    add = clients.add_parser("add", help="register a client (issuing its credentials if needed)")
    add.add_argument("name")
    add.add_argument("--database", **db)
    add.add_argument("--tls-dir", type=Path, help="credentials go to TLS_DIR/clients/NAME (with the CA)")
    add.add_argument("--out", type=Path, help="without --tls-dir: where to write token-only credentials")
    ls = clients.add_parser("list", help="registered clients")
    ls.add_argument("--database", **db)
    ls.add_argument("--format", choices=("table", "json"), default="table")
    revoke = clients.add_parser("revoke", help="refuse a client from now on")
    revoke.add_argument("name")
    revoke.add_argument("--database", **db)

    run = sub.add_parser("run", help="submit, list, follow, stop and resume runs on a coordinator")
    actions = run.add_subparsers(dest="action", required=True)
    for name, text in [("submit", "queue a run from a TOML file"), ("list", "runs on the coordinator"),
                       ("get", "one run"), ("follow", "live progress until the run ends"),
                       ("stop", "stop a run (its committed rounds are kept)"), ("resume", "continue a stopped run"),
                       ("download", "fetch a run's config and latest committed model into a run dir for `export`")]:
        p = actions.add_parser(name, help=text)
        if name == "submit":
            p.add_argument("config", type=Path)
            p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
            p.add_argument("--follow", action="store_true", help="then follow it until it ends")
        elif name != "list":
            p.add_argument("run_id")
        if name == "download":
            p.add_argument("--out", type=Path, required=True, help="the run dir to write (must not exist or be empty)")
        p.add_argument("--coordinator", default=os.environ.get("FEDADAPT_COORDINATOR", DEFAULT_ADDRESS),
                       help="HOST:PORT (default: $FEDADAPT_COORDINATOR or 127.0.0.1:7070)")
        p.add_argument("--credentials", type=Path, default=os.environ.get("FEDADAPT_CREDENTIALS"),
                       help="admin credentials dir (certs init makes DIR/admin)")
        p.add_argument("--insecure", action="store_true", help="plain-text connection (a coordinator started --insecure)")
        if name != "follow":  # every action that prints a result can print it as JSON
            p.add_argument("--format", choices=("table", "json"), default="table")


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "server":
        return _server_start(args)
    if args.command == "certs":
        from fedadapt.server.certs import init_certs

        made = init_certs(args.dir, _csv(args.hosts), _csv(args.clients), force=args.force)
        print(f"CA and server certificate in {args.dir} (hosts: {', '.join(made['hosts'])})")
        print(f"admin credentials: {made['admin']}")
        for path in made["clients"]:
            print(f"client credentials: {path}  (register: `fedadapt clients add {Path(path).name} "
                  f"--database URL --tls-dir {args.dir}`)")
        return 0
    if args.command == "clients":
        return _clients(args)
    return _run(args)


# ---------------------------------------------------------------- server
def _server_start(args) -> int:
    from fedadapt.core.memory import reuse_freed_memory
    from fedadapt.server import certs
    from fedadapt.server.hub import ClientHub
    from fedadapt.server.registry import Registry
    from fedadapt.server.runs import RunManager
    from fedadapt.server.service import Limits, serve
    from fedadapt.server.telemetry import RefusalLog, Stats, serve_metrics

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    for flag in ("max_payload_mb", "max_uploads", "upload_buffer_mb", "max_connections"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive")
    if args.straggler_factor < 0 or args.straggler_min_s < 0 or args.upload_idle_s <= 0:
        raise ConfigError("--straggler-factor and --straggler-min-s must be >= 0, --upload-idle-s > 0")
    _port_free(args.address)  # before the database and its blob dir are created
    reuse_freed_memory()
    store = _open_store(args.database, args.data_dir)
    credentials, admin = None, None
    if not args.insecure:
        credentials = certs.server_credentials(args.tls_dir)
        admin = _admin_check(certs.admin_token(args.tls_dir))
    hub = ClientHub(straggler_factor=args.straggler_factor, straggler_min_s=args.straggler_min_s)
    max_bytes = args.max_payload_mb * 1024 * 1024
    stats = Stats()
    refusals = RefusalLog(store, stats)
    manager = RunManager(store, hub, max_bytes, refusals)
    registry = Registry(store, on_revoked=lambda name, why: hub.revoke(name, why) and log_revoked(name, why))
    limits = Limits(max_bytes, max_uploads=args.max_uploads, buffer_bytes=args.upload_buffer_mb * 2**20,
                    idle_s=args.upload_idle_s, max_connections=args.max_connections)
    metrics = None
    if args.metrics_port:
        metrics, metrics_port = serve_metrics(stats, args.metrics_port, args.metrics_address)
    # the runs first: a run interrupted by a restart is the active run before the first client can re-upload
    manager.start()
    try:
        server, port = serve(args.address, hub, manager, authenticate=registry, admin_authenticate=admin,
                             credentials=credentials, max_payload_bytes=max_bytes, limits=limits, refusals=refusals,
                             stats=stats, seen=registry.seen)
    except BaseException:
        manager.close()
        registry.close()
        refusals.close()
        raise
    host = args.address.rsplit(":", 1)[0]
    print(f"coordinator listening on {host}:{port} ({'insecure' if args.insecure else 'TLS'}), "
          f"database {_shown(args.database)}" + (f", metrics on http://{args.metrics_address}:{metrics_port}/metrics"
                                                 if metrics else ""), file=sys.stderr, flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    print("coordinator shutting down", file=sys.stderr)
    manager.close()
    hub.shutdown()
    server.stop(grace=2.0).wait()
    registry.close()
    refusals.close()
    if metrics is not None:
        metrics.shutdown()
    store.close()
    return 0


def _port_free(address: str) -> None:
    """One line, before anything is written, when `address` cannot be listened on (gRPC would only say so after
    the store exists, in a C-core log line). Port 0 (any free port) is always fine."""
    import socket

    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit():
        raise ConfigError(f"--address {address!r} is not HOST:PORT")
    if int(port) == 0:
        return
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--address {address!r}: {exc.strerror}") from None
    family, kind, proto, _, where = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # as gRPC binds: a restart finds the old connections in TIME_WAIT, which must not count as "in use"
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(where)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {address}: {exc.strerror} (another coordinator running?)") from None


def log_revoked(name: str, why: str) -> None:
    logging.getLogger("fedadapt.server").warning("client %s %s: its session is closed", name, why)


def _admin_check(expected: str):
    import hmac

    from fedadapt.core.errors import AuthError

    def check(name: str, token: str) -> None:
        if not hmac.compare_digest(token.encode(), expected.encode()):
            raise AuthError("wrong admin credential for the Control service")

    return check


def _open_store(database: str, data_dir: Path | None, registry_only: bool = False):
    import tempfile

    from fedadapt.server.store import Store, normalize_url

    url = normalize_url(database)
    if data_dir is None:
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            data_dir = Path(url.database + ".blobs")
        elif registry_only:  # the client registry never touches blobs
            data_dir = Path(tempfile.mkdtemp(prefix="fedadapt-registry-"))
        else:
            raise ConfigError("give --data-dir (where tensor blobs are kept) for a non-file database")
    return Store(database, data_dir)


def _shown(database: str) -> str:
    from fedadapt.server.store import normalize_url

    return normalize_url(database).render_as_string(hide_password=True)


# ---------------------------------------------------------------- clients
def _clients(args) -> int:
    from fedadapt.server import certs

    store = _open_store(args.database, None, registry_only=True)
    try:
        if args.action == "add":
            target = args.tls_dir / "clients" / args.name if args.tls_dir is not None else (
                args.out or Path("credentials") / args.name)
            fresh = not target.exists()  # written by this command: removed again if the registration fails
            if args.tls_dir is not None:
                cred_dir = certs.issue_credentials(args.tls_dir, args.name)
            else:
                cred_dir = certs.token_credentials(target, args.name)
            token = (cred_dir / "token").read_text().strip()
            if _registered_with(store, args.name, token):
                print(f"{args.name!r} is already registered with these credentials ({cred_dir})")
                return 0
            try:
                store.add_client(args.name, token)
            except BaseException:
                if fresh:
                    shutil.rmtree(cred_dir, ignore_errors=True)
                raise
            print(f"registered {args.name!r}; copy {cred_dir}/ to that machine and start it with "
                  f"`fedadapt client start --credentials DIR ...`")
        elif args.action == "revoke":
            store.revoke_client(args.name)
            print(f"revoked {args.name!r}")
        else:
            rows = store.list_clients()
            if args.format == "json":
                print(json.dumps([{"name": r.name, "added": _iso(r.added_at), "revoked": _iso(r.revoked_at),
                                   "last_seen": _iso(r.last_seen)} for r in rows], indent=2))
            else:
                _table(["name", "added", "revoked", "last seen"],
                       [[r.name, _iso(r.added_at), _iso(r.revoked_at), _iso(r.last_seen)] for r in rows])
    finally:
        store.close()
    return 0


def _registered_with(store, name: str, token: str) -> bool:
    """Re-adding a client with the credentials it already has is a no-op (compose re-runs registration)."""
    from fedadapt.core.errors import AuthError

    try:
        store.check_client(name, token)
        return True
    except AuthError:
        return False


# ---------------------------------------------------------------- runs (Control client)
def _run(args) -> int:
    import grpc

    from fedadapt.proto import fedadapt_pb2 as pb
    from fedadapt.proto import fedadapt_pb2_grpc as pb_grpc

    channel, md = _control_channel(args)
    stub = pb_grpc.ControlStub(channel)
    try:
        with channel:
            if args.action == "submit":
                from fedadapt.core.config import load_config, scenario_path

                load_config(args.config, args.overrides)  # fail here, with the file name, before sending
                text = scenario_path(args.config).read_text()
                if args.overrides:
                    text = _with_overrides(text, args.overrides)
                info = stub.SubmitRun(pb.SubmitRunRequest(config_toml=text), metadata=md, timeout=60)
                _print_runs([info], args.format, single=True)
                return _follow(stub, md, info.run_id) if args.follow else 0
            if args.action == "list":
                _print_runs(stub.ListRuns(pb.ListRunsRequest(), metadata=md, timeout=30).runs, args.format)
                return 0
            if args.action == "follow":
                return _follow(stub, md, args.run_id)
            if args.action == "download":
                return _download(stub, md, args.run_id, args.out, args.format)
            call = {"get": stub.GetRun, "stop": stub.StopRun, "resume": stub.ResumeRun}[args.action]
            info = call(pb.RunRef(run_id=args.run_id), metadata=md, timeout=30)
            _print_runs([info], args.format, single=True)
            return 0
    except grpc.RpcError as exc:
        raise _rpc_error(exc, args.coordinator) from None


def _download(stub, md, run_id: str, out: Path, fmt: str = "table") -> int:
    """Write the run's files as they stream, each checked against its announced size and sha256, into a staging
    folder renamed to `out` only once all of them are whole."""
    import hashlib
    import shutil

    from fedadapt.proto import fedadapt_pb2 as pb

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder; give another --out")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    files: dict[str, int] = {}
    current = None  # (name, size, sha256, file, hash)

    def finish() -> None:
        name, size, want, f, h = current
        f.close()
        if files[name] != size or h.hexdigest() != want:
            raise FedadaptError(f"{name} arrived damaged ({files[name]} of {size} bytes, sha256 mismatch or short)")

    try:
        for part in stub.DownloadRun(pb.RunRef(run_id=run_id), metadata=md, timeout=3600):
            if part.name:
                if current:
                    finish()
                if part.name not in ("config.toml", "model.safetensors") or part.name in files:
                    raise FedadaptError(f"the coordinator sent an unexpected file {part.name!r}")
                current, rnd = (part.name, part.size, part.sha256, open(staging / part.name, "wb"),
                                hashlib.sha256()), part.round
                files[part.name] = 0
            elif current:
                current[3].write(part.chunk)
                current[4].update(part.chunk)
                files[current[0]] += len(part.chunk)
        if current:
            finish()
        if set(files) != {"config.toml", "model.safetensors"}:
            raise FedadaptError(f"the download of run {run_id} ended early ({', '.join(files) or 'nothing'} received)")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        if current and not current[3].closed:
            current[3].close()
        shutil.rmtree(staging, ignore_errors=True)
    if fmt == "json":
        print(json.dumps({"run_id": run_id, "round": rnd, "run_dir": str(out), "files": files}))
    else:
        print(f"run {run_id}, round {rnd}: config.toml and model.safetensors written to {out}; next: "
              f"fedadapt export {out} --format peft --out ADAPTER_DIR")
    return 0


def _control_channel(args):
    import grpc

    from fedadapt.proto.auth import channel_credentials, load_credentials, metadata

    creds = load_credentials(args.credentials) if args.credentials else None
    md = metadata(creds) if creds else ()
    if args.insecure:
        return grpc.insecure_channel(args.coordinator), md
    if creds is None:
        raise ConfigError("give --credentials DIR (the admin credentials from `fedadapt certs init`) or --insecure")
    return grpc.secure_channel(args.coordinator, channel_credentials(creds)), md


def _rpc_error(exc, target: str) -> FedadaptError:
    import grpc

    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"coordinator {target} is not reachable ({exc.details()})")
    return FedadaptError(exc.details() or code.name)


def _follow(stub, md, run_id: str) -> int:
    from fedadapt.proto import fedadapt_pb2 as pb

    status = ""
    for ev in stub.FollowRun(pb.RunRef(run_id=run_id), metadata=md):
        if ev.kind == "round":
            r = json.loads(ev.record_json)
            parts = [f"round {ev.round}"]
            if r.get("loss") is not None:
                parts.append(f"loss {r['loss']:.4f}")
            if r.get("accuracy") is not None:
                parts.append(f"accuracy {r['accuracy']:.3f}")
            parts.append(f"{len(r.get('clients', []))} results")
            eps = (r.get("strategy") or {}).get("privacy/epsilon", (r.get("strategy") or {}).get("privacy/epsilon_max"))
            if eps is not None:  # the privacy ledger (fedadapt.privacy): epsilon spent so far
                parts.append(f"epsilon {eps:.3f}")
            if r.get("rejected"):
                parts.append(f"{len(r['rejected'])} rejected")
            refused = r.get("refused") or {}
            if refused:
                parts.append(f"{sum(refused.values())} refused (" + ", ".join(f"{code} {n}" for code, n in
                                                                           refused.items()) + ")")
            if r.get("skipped"):
                parts.append(f"skipped: {r['skipped']}")
            print("  ".join(parts), flush=True)
        elif ev.kind == "waiting":
            if ev.status:
                print(f"run {run_id}: {ev.status}", flush=True)
        else:
            status = ev.status
            error = json.loads(ev.record_json or "{}").get("error")
            print(f"run {run_id}: {status}" + (f" ({error})" if error else ""), flush=True)
    return {"finished": 0, "failed": EXIT_RUN_FAILED, "stopped": EXIT_RUN_STOPPED}.get(status, EXIT_UNAVAILABLE)


def _print_runs(runs, fmt: str, single: bool = False) -> None:
    rows = [{"run_id": r.run_id, "name": r.name, "status": r.status, "round": r.round, "rounds": r.rounds,
             "created": r.created, "updated": r.updated, "error": r.error, "model_path": r.model_path,
             "waiting": r.waiting, "refused": r.refused} for r in runs]
    if fmt == "json":
        print(json.dumps(rows[0] if single else rows, indent=2))
        return
    _table(["run", "name", "status", "round", "created", "refused", "error"],
           [[r["run_id"], r["name"], r["status"] + (f" ({r['waiting']})" if r["waiting"] else ""),
             f"{r['round']}/{r['rounds']}", r["created"], r["refused"], r["error"]] for r in rows])


def _with_overrides(text: str, overrides: list[str]) -> str:
    import tomllib

    import tomli_w

    from fedadapt.core.config import apply_override

    raw = tomllib.loads(text)
    for item in overrides:
        apply_override(raw, item)
    return tomli_w.dumps(raw)


def _table(headers: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(*headers)
    for row in rows:
        t.add_row(*(str(v) for v in row))
    Console().print(t)


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _iso(t) -> str:
    return t.isoformat(timespec="seconds") if t is not None else ""
