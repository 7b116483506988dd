#!/usr/bin/env python3
"""A coordinator under abuse: legitimate clients' rounds with and without hostile streams beside them.

One `fedadapt server start --insecure` process (SQLite, --max-payload-mb 4); N legitimate client agents
(ClientAgent with an echo recipe: each round every client is asked and sends the global tensors of a
2.4k-parameter MLP back; spread over a few processes, each agent with its own channel, session, task stream
and heartbeats), one run with every client asked every round. While the run goes on, phases alternate:
quiet (only the legitimate clients) and hostile (H more streams from another process, kept open or reopened
as soon as they end):

- silent: registered clients that open an upload and send nothing (the coordinator waits for a header for
  --upload-idle-s, then refuses; they reopen);
- slow-loris: raw TCP connections that send the HTTP/2 preface one byte every 2 s (gRPC's handshake timeout
  closes them; they reopen);
- oversized: registered clients whose upload announces 1 TiB (refused from its header; they retry each
  second), or whose first message is 5 MiB, over the coordinator's message limit (gRPC answers
  RESOURCE_EXHAUSTED; they retry every 5 s);
- garbage: registered clients that send bytes that are not a ResultPart (refused "malformed"; they retry each
  second).

Measured: the round period (time between consecutive round commits, from the store) in each phase, the
coordinator's resident memory, thread count and CPU time sampled every 0.25 s, and how long its thread count
takes to return to its quiet level after the last hostile phase. The hostile process runs at nice 19: on a
machine shared by all the parties, what it spends itself would otherwise be what slows the legitimate
clients; the coordinator's own cost of the hostile streams is its CPU per round.

    .venv/bin/python benchmarks/coordinator_load.py --clients 200 --hostile 200 --rounds 12 --cycles 2

Raw data: benchmarks/results/coordinator_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import ECHO_RUN_TOML, REPO, RESULTS, CpuMeter, command_line, log, machine_facts, utc_now, write_json

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

RESULTS_JSON = RESULTS / "coordinator_load.json"
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # each hostile stream its own TCP connection
HERE = Path(__file__).resolve()


# ------------------------------------------------------------------------------------------ hostile process
def hostile(target: str, creds_root: Path, names: list[str], per_kind: int) -> None:
    """Keep `per_kind` streams of each hostile kind open against `target` until SIGTERM."""
    import grpc

    from fedadapt.proto.auth import load_credentials, metadata

    host, port = target.rsplit(":", 1)
    creds = [load_credentials(creds_root / n) for n in names]
    stop = asyncio.Event()
    counts = {"silent": 0, "slowloris": 0, "oversized": 0, "garbage": 0}

    async def silent(i: int) -> None:
        c = creds[i % len(creds)]
        async with grpc.aio.insecure_channel(target, options=OWN_CONNECTION) as ch:
            up = ch.stream_unary("/fedadapt.v1.Coordinator/PushResult")
            while not stop.is_set():
                async def nothing():
                    await stop.wait()
                    return
                    yield
                try:
                    await up(nothing(), metadata=metadata(c), timeout=600)
                except grpc.RpcError:
                    pass
                counts["silent"] += 1
                await asyncio.sleep(0.5)

    async def message_loop(i: int, kind: str, body: bytes, pause: float = 1.0) -> None:
        c = creds[i % len(creds)]
        async with grpc.aio.insecure_channel(target, options=[*OWN_CONNECTION,
                                                              ("grpc.max_send_message_length", 64 * 2**20)]) as ch:
            up = ch.stream_unary("/fedadapt.v1.Coordinator/PushResult")
            while not stop.is_set():
                try:
                    await up(iter([body]), metadata=metadata(c), timeout=60)
                except grpc.RpcError:
                    pass
                counts[kind] += 1
                await asyncio.sleep(pause)

    async def slowloris() -> None:
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        while not stop.is_set():
            try:
                _, writer = await asyncio.open_connection(host, int(port))
                for b in preface:
                    writer.write(bytes([b]))
                    await writer.drain()
                    await asyncio.sleep(2.0)
                    if stop.is_set():
                        break
                writer.close()
            except (OSError, ConnectionError):
                pass
            counts["slowloris"] += 1
            await asyncio.sleep(0.5)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        garbage = bytes(random.Random(0).getrandbits(8) for _ in range(4096))
        oversized = b"\x12\x80\x80\x80\x05" + bytes(5 * 2**20)  # field 2, a 10 MiB length: one 5 MiB message
        from fedadapt.proto import fedadapt_pb2 as pb

        announced = pb.ResultPart(header=pb.ResultHeader(session="x" * 32, run_id="any", round=1, num_examples=1,
                                                         payload=pb.Payload(size=2**40, sha256=bytes(32))),
                                  chunk=bytes(60_000)).SerializeToString()  # announces 1 TiB
        tasks = [asyncio.create_task(silent(i)) for i in range(per_kind)]
        tasks += [asyncio.create_task(slowloris()) for _ in range(per_kind)]
        half = per_kind // 2
        tasks += [asyncio.create_task(message_loop(i, "oversized", oversized, 5.0)) for i in range(half)]
        tasks += [asyncio.create_task(message_loop(i, "oversized", announced)) for i in range(half, per_kind)]
        tasks += [asyncio.create_task(message_loop(i, "garbage", b"\xff\xff" + garbage)) for i in range(per_kind)]
        print("hostile started", flush=True)
        await stop.wait()
        await asyncio.sleep(0.5)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        print(json.dumps(counts), flush=True)

    asyncio.run(main())


# ------------------------------------------------------------------------------------------ the benchmark
def run(clients: int, n_hostile: int, rounds: int, cycles: int, client_procs: int, settle_s: float) -> dict:
    import grpc
    import psutil
    from harness import kill_processes

    from fedadapt.proto import fedadapt_pb2 as pb
    from fedadapt.proto import fedadapt_pb2_grpc as pb_grpc
    from fedadapt.server.certs import token_credentials
    from fedadapt.server.store import Store

    per_kind = n_hostile // 4
    tmp = Path(tempfile.mkdtemp(prefix="coordinator-load-"))
    db = f"sqlite:///{tmp / 'db.sqlite'}"
    names = [f"c{i:03d}" for i in range(clients)]
    bad = [f"h{i:03d}" for i in range(max(per_kind, 1))]
    with Store(db, tmp / "blobs") as store:
        for n in names + bad:
            d = token_credentials(tmp / "creds" / n, n)
            store.add_client(n, (d / "token").read_text().strip())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = f"127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen] = []
    out: dict = {"clients": clients, "hostile_streams": per_kind * 4, "rounds_per_phase": rounds, "cycles": cycles}
    samples: list[tuple[float, float, int]] = []
    stop_sampling = threading.Event()
    try:
        coord_log = open(tmp / "coordinator.log", "wb")
        coord = subprocess.Popen([sys.executable, "-m", "fedadapt.cli", "server", "start", "--database", db,
                                  "--data-dir", str(tmp / "blobs"), "--address", target, "--insecure",
                                  "--max-payload-mb", "4"], stdout=coord_log, stderr=subprocess.STDOUT, env=env,
                                 cwd=REPO)
        procs.append(coord)
        deadline = time.monotonic() + 120
        while b"coordinator listening" not in (tmp / "coordinator.log").read_bytes():
            if time.monotonic() > deadline or coord.poll() is not None:
                raise RuntimeError((tmp / "coordinator.log").read_text())
            time.sleep(0.1)
        cp = psutil.Process(coord.pid)

        def thread_census() -> dict[str, int]:  # the coordinator's threads by name (gRPC's C threads included)
            out: dict[str, int] = {}
            for t in Path(f"/proc/{coord.pid}/task").iterdir():
                try:
                    n = (t / "comm").read_text().strip()
                except OSError:
                    continue
                out[n] = out.get(n, 0) + 1
            return dict(sorted(out.items()))

        thread_names = {}

        def sample():
            while not stop_sampling.wait(0.25):
                try:
                    t = cp.cpu_times()
                    samples.append((time.monotonic(), cp.memory_info().rss / 2**20, cp.num_threads(), t.user + t.system))
                except psutil.Error:
                    return

        threading.Thread(target=sample, daemon=True).start()
        groups = [names[i::client_procs] for i in range(client_procs)]
        for g in groups:
            p = subprocess.Popen([sys.executable, str(HERE.parent / "fedadapt_deploy.py"), "_echo", target,
                                  str(tmp / "creds"), *g], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True, env=env, cwd=REPO)
            procs.append(p)
            assert p.stdout.readline().strip() == "clients started"
        total = 100_000  # stopped when the phases are measured
        stub = pb_grpc.ControlStub(grpc.insecure_channel(target))
        run_id = stub.SubmitRun(pb.SubmitRunRequest(config_toml=ECHO_RUN_TOML.format(name="load",
            rounds=total, clients=clients, examples=clients * 8)), timeout=60).run_id
        store = Store(db, tmp / "blobs")

        def wait_rounds(n: int) -> None:
            deadline = time.monotonic() + 600
            while len(store.commit_times(run_id)) < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"round {n} not committed; {stub.GetRun(pb.RunRef(run_id=run_id)).waiting}")
                time.sleep(0.1)

        wait_rounds(3)  # warm-up: every agent joined, registered and answered
        thread_names["quiet"] = thread_census()
        phases = []
        done = 3
        meter = CpuMeter().start()
        for cycle in range(cycles):
            for kind in ("quiet", "hostile"):
                h = None
                if kind == "hostile":
                    h = subprocess.Popen([sys.executable, str(HERE), "_hostile", target, str(tmp / "creds"),
                                          str(per_kind), *bad], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         text=True, env=env, cwd=REPO)
                    procs.append(h)
                    assert h.stdout.readline().strip() == "hostile started"
                    time.sleep(settle_s)  # every hostile stream open before the rounds that count
                    done = len(store.commit_times(run_id))
                t0 = time.monotonic()
                wait_rounds(done + rounds + 1)
                t1 = time.monotonic()
                times = store.commit_times(run_id)[done:done + rounds + 1]
                hostile_counts = None
                if h is not None:
                    h.send_signal(signal.SIGTERM)
                    hostile_counts = json.loads(h.communicate(timeout=60)[0].strip().splitlines()[-1])
                    procs.remove(h)
                periods = [b - a for a, b in zip(times, times[1:])]
                phases.append({"kind": kind, "cycle": cycle, "periods_s": [round(p, 4) for p in periods],
                               "t0": t0, "t1": t1, "hostile_cycles": hostile_counts})
                log(f"{kind} {cycle}: round median {statistics.median(periods) * 1e3:.0f} ms "
                    f"(min {min(periods) * 1e3:.0f}, max {max(periods) * 1e3:.0f})")
                done = len(store.commit_times(run_id))
        meter.stop()
        hostile_end = max(p["t1"] for p in phases if p["kind"] == "hostile")
        quiet_end = time.monotonic() + 65  # the run goes on quietly for a minute after the last hostile stream
        while time.monotonic() < quiet_end:
            time.sleep(1.0)
        thread_names["a minute after the last hostile phase"] = thread_census()
        stub.StopRun(pb.RunRef(run_id=run_id), timeout=60)
        stopped_at = time.monotonic()
        time.sleep(45)  # and then the coordinator idles (every client still connected)
        thread_names["idle after the run"] = thread_census()
        stop_sampling.set()
        refused = store.refusal_counts(run_id)
        store.close()
    finally:
        stop_sampling.set()
        kill_processes([psutil.Process(p.pid) for p in procs if p.poll() is None])

    def window(t0, t1):
        return [s for s in samples if t0 <= s[0] <= t1]

    quiet = [s for p in phases if p["kind"] == "quiet" for s in window(p["t0"], p["t1"])]
    loud = [s for p in phases if p["kind"] == "hostile" for s in window(p["t0"], p["t1"])]
    quiet_threads = statistics.median(s[2] for s in quiet)
    idle = [s for s in samples if s[0] > stopped_at + 30]
    after = [s for s in samples if hostile_end < s[0] < stopped_at]
    back = next((s[0] - hostile_end for s in after if s[2] <= quiet_threads), None)
    def cpu_per_round(kind):
        spent = sum(window(p["t0"], p["t1"])[-1][3] - window(p["t0"], p["t1"])[0][3] for p in phases if p["kind"] == kind)
        return round(spent / sum(len(p["periods_s"]) for p in phases if p["kind"] == kind), 4)

    q = [x for p in phases if p["kind"] == "quiet" for x in p["periods_s"]]
    hst = [x for p in phases if p["kind"] == "hostile" for x in p["periods_s"]]
    out.update({
        "run_id": run_id, "phases": [{k: v for k, v in p.items() if k not in ("t0", "t1")} for p in phases],
        "round_median_quiet_s": round(statistics.median(q), 4), "round_median_hostile_s": round(statistics.median(hst), 4),
        "round_ratio_hostile_over_quiet": round(statistics.median(hst) / statistics.median(q), 3),
        "coordinator_cpu_s_per_round": {"quiet": cpu_per_round("quiet"), "hostile": cpu_per_round("hostile")},
        "rss_mb": {"quiet_median": round(statistics.median(s[1] for s in quiet), 1),
                   "quiet_max": round(max(s[1] for s in quiet), 1), "hostile_max": round(max(s[1] for s in loud), 1),
                   "overall_max": round(max(s[1] for s in samples), 1)},
        "threads": {"quiet_median": quiet_threads, "hostile_max": max(s[2] for s in loud),
                    "after_last_hostile_every_5s": [s[2] for s in after[::20]],
                    "seconds_back_to_quiet_level": None if back is None else round(back, 2),
                    "idle_after_the_run": [s[2] for s in idle[::20]],
                    "by_name": thread_names},
        "refusals_during_run": refused, "background_cores": meter.background_cores,
    })
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_hostile"]:
        os.nice(19)  # the attacker shares this machine: its own CPU must not be what slows the legitimate clients
        hostile(argv[1], Path(argv[2]), argv[4:], int(argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--hostile", type=int, default=200, help="hostile streams, a quarter of each kind")
    ap.add_argument("--rounds", type=int, default=12, help="rounds measured per phase")
    ap.add_argument("--cycles", type=int, default=2, help="quiet/hostile phase pairs")
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--settle-s", type=float, default=5.0, help="wait after the hostile process started")
    ap.add_argument("--json", type=Path, default=RESULTS_JSON)
    args = ap.parse_args(argv)
    result = run(args.clients, args.hostile, args.rounds, args.cycles, args.client_procs, args.settle_s)
    data = {"benchmark": "coordinator_load", "started_utc": utc_now(), "command": command_line(),
            "threads": "coordinator: OMP_NUM_THREADS=1, event loop + 2 payload + 4 control workers; agents: "
                       "OMP_NUM_THREADS=1", **result, "machine": machine_facts()}
    write_json(args.json, data)
    print(json.dumps({k: v for k, v in data.items() if k not in ("phases", "machine")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
