#!/usr/bin/env python3
"""fedadapt's deployment runtime on loopback, measured the way deploy_vs_flower.py measures Flower's.

* Per-round overhead: a `fedadapt server start` process and N persistent client agents (spread over a
  few processes, each agent with its own gRPC channel, session and task stream) whose recipe echoes the
  global tensors back (no training), FedAvg on a 2.4k-parameter MLP. A round's period is the time
  between consecutive round commits in the coordinator's database (configure, deliver, collect,
  validate, aggregate, commit): all of it is framework overhead, clients' included. The coordinator's
  CPU time per round (psutil) is its own share.
* Upload throughput: one client pushes a P-byte payload (safetensors bytes, 3 MiB chunks, sha256 of the
  whole computed by the sender while it streams and verified by the coordinator) as its answer to a round of
  a running coordinator (benchmarks/coordinator_upload.py); timed from its first part to the coordinator's
  reply, median of repeats.

    .venv/bin/python benchmarks/fedadapt_deploy.py overhead --clients 50 --rounds 30
    .venv/bin/python benchmarks/fedadapt_deploy.py upload --mib 100 --repeats 5
    .venv/bin/python benchmarks/fedadapt_deploy.py grpc-ceiling --mib 100 --repeats 5   # grpcio alone

benchmarks/deploy_vs_flower.py runs this side by side with Flower's deployment runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import ECHO_RUN_TOML, REPO, write_json

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))



class EchoRecipe:
    """Sends the global tensors straight back: the client does no work, so only the framework is timed."""

    def prepare(self, model, task):
        self.tensors = task.tensors

    def train(self, model, data, task, privacy=None):
        from fedadapt.strategies.base import ClientResult

        return ClientResult("", 8, self.tensors, {"loss": 0.0})

    def evaluate(self, model, data, task):
        return {}


def host_echo_clients(target: str, names: list[str], creds_root: Path) -> None:
    """Run N echo ClientAgents in this process until SIGTERM (the client side of `overhead`)."""
    from fedadapt.client.agent import ClientAgent
    from fedadapt.client.workload import Workload
    from fedadapt.proto.auth import load_credentials
    from fedadapt.runtime.executor import Executor

    agents = []
    for name in names:
        creds = load_credentials(creds_root / name)
        agent = ClientAgent(target, creds, lambda spec: Workload(Executor(None, EchoRecipe()), [0] * 8), insecure=True,
                            log=lambda msg: None)
        agents.append(agent)
        threading.Thread(target=agent.run, daemon=True).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print("clients started", flush=True)
    done.wait()
    for a in agents:
        a.stop()


def overhead(clients: int, rounds: int, hosts: int) -> dict:
    """Round period with `clients` echo clients spread over `hosts` processes, and the coordinator's own
    CPU time per round (the part of the period that is the coordinator's work)."""
    import psutil
    from deploy import Deployment

    from fedadapt.server.certs import token_credentials
    from fedadapt.server.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        d = Deployment(root, f"sqlite:///{root / 'db.sqlite'}", tls=False)
        names = [f"client-{i:03d}" for i in range(clients)]
        with Store(d.db_url, d.data_dir) as store:
            for name in names:
                store.add_client(name, (token_credentials(root / "creds" / name, name) / "token").read_text().strip())
        procs = []
        try:
            coord = d.start_coordinator()
            for h in range(hosts):
                procs.append(subprocess.Popen([sys.executable, __file__, "_echo", d.address, str(root / "creds"),
                                               *names[h::hosts]], env=d.env, stdout=subprocess.PIPE, text=True))
            for p in procs:
                p.stdout.readline()
            run_id = d.submit(ECHO_RUN_TOML.format(name="overhead", rounds=rounds, clients=clients,
                                                   examples=clients * 10))
            cpu = psutil.Process(coord.p.pid)
            d.wait_status(run_id, ("running",))
            coord.wait_for("round 2 committed", timeout=300)
            t0 = cpu.cpu_times()
            coord.wait_for(f"round {rounds} committed", timeout=600)
            t1 = cpu.cpu_times()
            info = d.wait_status(run_id, ("finished", "failed"), timeout=60)
            assert info["status"] == "finished", d.logs()
            with Store(d.db_url, d.data_dir) as store:
                stamps = store.commit_times(run_id)
                records = [r for _, r in store.records(run_id)]
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)
            d.close()
    periods = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # from round 3: no first contact, no model build
    coord_cpu = (t1.user + t1.system - t0.user - t0.system) / (rounds - 2)
    return {"clients": clients, "client_processes": hosts, "rounds": rounds,
            "round_period_ms": [p * 1000 for p in periods], "median_round_ms": statistics.median(periods) * 1000,
            "coordinator_cpu_ms_per_round": coord_cpu * 1000,
            "results_per_round": [len(r["clients"]) for r in records]}


def upload(mib: int, repeats: int) -> dict:
    """One client answers round after round with a `mib` MiB upload to a coordinator (coordinator_upload.py's:
    the service and hub of `fedadapt server start`, one round open for the uploader at a time); the sha256 is
    computed while the chunks stream and sent last, as the client daemon does. Median push time."""
    from coordinator_upload import _payload, fedadapt_side

    from fedadapt.core.memory import reuse_freed_memory

    reuse_freed_memory()  # as the client daemon does
    payload = _payload(mib)
    coord = subprocess.Popen([sys.executable, str(Path(__file__).with_name("coordinator_upload.py")), "_coordinator",
                              str(mib), "0"], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    times = []
    try:
        push, channel = fedadapt_side(int(coord.stdout.readline()), payload)
        with channel:
            for i in range(repeats + 1):
                elapsed = push()
                if i:  # the first push warms the channel
                    times.append(elapsed)
    finally:
        coord.terminate()
        coord.wait(timeout=30)
    med = statistics.median(times)
    return {"mib": mib, "repeats": repeats, "seconds": times, "median_s": med, "mb_per_s": mib * 2**20 / med / 1e6}


def serve_sink() -> None:
    """A bare gRPC server that counts the bytes of a client stream (the child side of `grpc-ceiling`)."""
    from concurrent import futures

    import grpc

    def sink(parts, context):
        return sum(len(p) for p in parts).to_bytes(8, "little")

    handler = grpc.method_handlers_generic_handler(
        "bench.Sink", {"Up": grpc.stream_unary_rpc_method_handler(sink)})  # raw bytes: no protobuf
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()


def grpc_ceiling(mib: int, repeats: int) -> dict:
    """What grpcio itself moves on this machine: the same bytes in the same 3 MiB chunks from a client to a
    server process, with no protobuf, no hashing and no checks. fedadapt's upload cannot beat this."""
    import grpc

    from fedadapt.proto.chunks import CHUNK_BYTES

    payload = os.urandom(mib * 2**20)
    view = memoryview(payload)
    sink = subprocess.Popen([sys.executable, __file__, "_sink"], stdout=subprocess.PIPE, text=True)
    times = []
    try:
        port = int(sink.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            up = channel.stream_unary("/bench.Sink/Up")
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                got = up(bytes(view[s:s + CHUNK_BYTES]) for s in range(0, len(payload), CHUNK_BYTES))
                elapsed = time.perf_counter() - t0
                assert int.from_bytes(got, "little") == len(payload)
                if i:
                    times.append(elapsed)
    finally:
        sink.terminate()
        sink.wait(timeout=30)
    med = statistics.median(times)
    return {"mib": mib, "repeats": repeats, "seconds": times, "median_s": med, "mb_per_s": mib * 2**20 / med / 1e6}


def main() -> None:
    if sys.argv[1:2] == ["_echo"]:
        host_echo_clients(sys.argv[2], sys.argv[4:], Path(sys.argv[3]))
        return
    if sys.argv[1:2] == ["_sink"]:
        serve_sink()
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--clients", type=int, default=50)
    o.add_argument("--rounds", type=int, default=30)
    o.add_argument("--hosts", type=int, default=5, help="client processes the agents are spread over")
    u = sub.add_parser("upload")
    u.add_argument("--mib", type=int, default=100)
    u.add_argument("--repeats", type=int, default=5)
    g = sub.add_parser("grpc-ceiling")
    g.add_argument("--mib", type=int, default=100)
    g.add_argument("--repeats", type=int, default=5)
    for p in (o, u, g):
        p.add_argument("--json", type=Path, help="also write the whole result (with per-round lists) here")
    args = ap.parse_args()
    if args.what == "overhead":
        result = overhead(args.clients, args.rounds, args.hosts)
    else:
        result = (upload if args.what == "upload" else grpc_ceiling)(args.mib, args.repeats)
    if args.json:
        write_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=2))


if __name__ == "__main__":
    main()
