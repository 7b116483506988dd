#!/usr/bin/env python3
"""100 MiB upload throughput of the coordinator, side by side with a bare grpcio stream of the same chunks and
the raw loopback socket (the limit), in one command, repeats interleaved.

* fedadapt: a coordinator process (`fedadapt.server.service.serve`, its hub with one round open for the
  uploader; reuse_freed_memory as `fedadapt server start` does) and an uploader in this process that joins,
  holds its task stream and answers each round's task with P bytes exactly as the client daemon does: header
  first, chunks of 3 MiB framed by hand, the sha256 computed while the chunks stream and sent last
  (`framed_upload`). The coordinator checks the header, copies and hashes each chunk on a worker thread while
  the next is received, verifies the digest and files the result. Timed from before the first part to the
  reply: everything the uploader and the coordinator do for an upload. With `--validate` the coordinator also
  runs the round engine's content check (decode, shapes, finiteness) before it answers, as a coordinator
  running a real run does.
* grpcio alone: the same bytes, in the same 3 MiB chunks, to a bare grpcio server process (sync, 4 workers)
  that only counts them: no protobuf, no hashing, no checks, no copy (benchmarks/fedadapt_deploy.py's
  grpc-ceiling).
* raw loopback socket: benchmarks/loopback_socket.py, one sendall into a preallocated buffer.

    .venv/bin/python benchmarks/coordinator_upload.py --mib 100 --repeats 15

Medians over the repeats with min and max; the coordinator's and the uploader's CPU per upload. Raw data:
benchmarks/results/coordinator_upload.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness import REPO, RESULTS, CpuMeter, command_line, log, machine_facts, utc_now, write_json

sys.path.insert(0, str(REPO))

RESULTS_JSON = RESULTS / "coordinator_upload.json"
MIB = 2**20
TOKEN = "benchmark-uploader-token-0123456789"


# ------------------------------------------------------------------------------------- coordinator side
def serve_coordinator(mib: int, validate: bool) -> None:
    """A coordinator whose hub opens round after round for one client, "uploader" (child process)."""
    import signal

    import torch

    from fedadapt.core import codec
    from fedadapt.core.errors import AuthError
    from fedadapt.core.memory import reuse_freed_memory
    from fedadapt.runtime.engine import TaskMessage
    from fedadapt.server.hub import ClientHub
    from fedadapt.server.service import serve

    reuse_freed_memory()
    torch.set_num_threads(1)

    def authenticate(name, token):
        if (name, token) != ("uploader", TOKEN):
            raise AuthError("not the uploader")

    hub = ClientHub()
    n = mib * MIB // 4 - 64  # float32s: the safetensors header takes the rest
    spec = {"w": torch.Size([n])}
    validator = None
    if validate:
        def validator(msg):  # what the round engine's check does with an upload: decode, contract, finiteness
            codec.decode(msg.payload, contract={"w": codec.TensorSpec((n,), torch.float32)},
                         max_bytes=(mib + 1) * MIB)
    hub.begin_run("bench", json.dumps({"w": list(spec["w"])}), validator=validator)
    server, port = serve("127.0.0.1:0", hub, authenticate=authenticate, max_payload_bytes=(mib + 1) * MIB)
    print(port, flush=True)

    def rounds():
        rnd = 0
        while True:
            if not hub.wait_for_clients(1, timeout=60):
                continue
            rnd += 1
            hub.run([TaskMessage("uploader", rnd, "train", {}, b"")], timeout=None)

    threading.Thread(target=rounds, daemon=True).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    hub.shutdown()
    server.stop(grace=1.0).wait()


def fedadapt_side(port: int, payload: bytes):
    """An uploader joined to the coordinator on `port`: returns push(), which answers the next task."""
    import grpc

    from fedadapt.proto import fedadapt_pb2 as pb
    from fedadapt.proto import fedadapt_pb2_grpc as pb_grpc
    from fedadapt.proto.auth import NAME_KEY, TOKEN_KEY
    from fedadapt.proto.chunks import framed_upload, pull_task, push_result

    md = ((NAME_KEY, "uploader"), (TOKEN_KEY, TOKEN))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.CoordinatorStub(channel)
    reply = stub.Join(pb.JoinRequest(capabilities_json="{}"), metadata=md, timeout=60)
    assert reply.digest_trailer
    session = reply.session
    stream = iter(pull_task(channel)(pb.PullRequest(session=session), metadata=md))
    upload = push_result(channel)

    def push() -> float:
        part = next(stream)  # the round's task (an empty payload: one part)
        header = pb.ResultHeader(session=session, run_id=part.header.run_id, round=part.header.round,
                                 num_examples=1, metrics_json="{}")
        t0 = time.perf_counter()
        got = upload(framed_upload(header, payload), metadata=md, timeout=300)
        elapsed = time.perf_counter() - t0
        assert got.status == pb.PushReply.ACCEPTED, got
        return elapsed

    return push, channel


# ------------------------------------------------------------------------------------- bare grpcio side
def bare_side(port: int, payload: bytes):
    import grpc

    from fedadapt.proto.chunks import CHUNK_BYTES

    view = memoryview(payload)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    up = channel.stream_unary("/bench.Sink/Up")

    def push() -> float:
        t0 = time.perf_counter()
        got = up(bytes(view[s:s + CHUNK_BYTES]) for s in range(0, len(payload), CHUNK_BYTES))
        elapsed = time.perf_counter() - t0
        assert int.from_bytes(got, "little") == len(payload)
        return elapsed

    return push, channel


def _cpu(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _payload(mib: int) -> bytes:
    """Valid safetensors of one float32 tensor filling `mib` MiB (random values: nothing compresses)."""
    import torch

    from fedadapt.core import codec

    n = mib * MIB // 4 - 64
    return bytes(codec.encode({"w": torch.rand(n, generator=torch.Generator().manual_seed(0))}))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_coordinator"]:
        serve_coordinator(int(argv[1]), argv[2] == "1")
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--validate", action="store_true", help="the coordinator also runs the engine's content check")
    ap.add_argument("--socket-repeats", type=int, default=15)
    ap.add_argument("--json", type=Path, default=RESULTS_JSON)
    args = ap.parse_args(argv)

    import psutil

    from fedadapt.core.memory import reuse_freed_memory

    reuse_freed_memory()  # as the client daemon does
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    payload = _payload(args.mib)
    here = Path(__file__).resolve()
    coord = subprocess.Popen([sys.executable, str(here), "_coordinator", str(args.mib), "1" if args.validate else "0"],
                             stdout=subprocess.PIPE, text=True, env=env)
    sink = subprocess.Popen([sys.executable, str(here.parent / "fedadapt_deploy.py"), "_sink"], stdout=subprocess.PIPE,
                            text=True, env=env)
    sides = {}
    times: dict[str, list[float]] = {"fedadapt": [], "grpcio alone": []}
    cpu: dict[str, list[tuple[float, float]]] = {"fedadapt": [], "grpcio alone": []}
    try:
        sides["fedadapt"] = (*fedadapt_side(int(coord.stdout.readline()), payload), coord.pid)
        sides["grpcio alone"] = (*bare_side(int(sink.stdout.readline()), payload), sink.pid)
        for name, (push, _, _) in sides.items():  # warm-up: channels, pages, the coordinator's buffers
            push(), push()
        meter = CpuMeter().start()
        for i in range(args.repeats):
            for name, (push, _, pid) in (sides.items() if i % 2 == 0 else reversed(sides.items())):
                c0, s0 = psutil.Process().cpu_times(), _cpu(pid)
                times[name].append(push())
                c1 = psutil.Process().cpu_times()
                cpu[name].append((c1.user + c1.system - c0.user - c0.system, _cpu(pid) - s0))
            log(f"repeat {i + 1}/{args.repeats}: fedadapt {times['fedadapt'][-1] * 1e3:.0f} ms, "
                f"grpcio alone {times['grpcio alone'][-1] * 1e3:.0f} ms")
        meter.stop()
    finally:
        for _, channel, _ in sides.values():
            channel.close()
        for p in (coord, sink):
            p.terminate()
            p.wait(timeout=30)

    from loopback_socket import measure

    sock = measure(args.mib * MIB, args.socket_repeats)
    size = args.mib * MIB
    rows = {}
    for name, t in times.items():
        med = statistics.median(t)
        rows[name] = {"median_s": round(med, 4), "min_s": round(min(t), 4), "max_s": round(max(t), 4),
                      "MBps_median": round(size / med / 1e6, 1),
                      "sender_cpu_s_median": round(statistics.median(c for c, _ in cpu[name]), 4),
                      "receiver_cpu_s_median": round(statistics.median(s for _, s in cpu[name]), 4),
                      "runs_s": [round(x, 4) for x in t]}
    rows["raw loopback socket"] = {"median_s": sock["median_s"], "min_s": sock["min_s"], "max_s": sock["max_s"],
                                   "MBps_median": sock["MBps_median"],
                                   "sender_cpu_s_median": None, "receiver_cpu_s_median": None,
                                   "runs_s": sock["runs_s"]}
    ratio = rows["grpcio alone"]["median_s"] / rows["fedadapt"]["median_s"]
    data = {
        "benchmark": "coordinator_upload", "started_utc": utc_now(), "command": command_line(),
        "size_bytes": size, "repeats": args.repeats, "validate": args.validate,
        "threads": "uploader: gRPC's own; coordinator: event loop + 2 payload workers (OMP_NUM_THREADS=1); "
                   "bare sink: sync server, 4 workers",
        "background_cores_during_grpc_repeats": meter.background_cores,
        "fedadapt_over_grpcio_throughput": round(ratio, 3),
        "rows": rows, "machine": machine_facts(),
    }
    write_json(args.json, data)
    print(f"| upload of {args.mib} MiB | median ms (min-max) | MB/s | sender CPU ms | receiver CPU ms |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        cpu_s = "" if r["sender_cpu_s_median"] is None else f"{r['sender_cpu_s_median'] * 1e3:.0f}"
        cpu_r = "" if r["receiver_cpu_s_median"] is None else f"{r['receiver_cpu_s_median'] * 1e3:.0f}"
        print(f"| {name} | {r['median_s'] * 1e3:.0f} ({r['min_s'] * 1e3:.0f}-{r['max_s'] * 1e3:.0f}) | "
              f"{r['MBps_median']:.0f} | {cpu_s} | {cpu_r} |")
    print(f"\nfedadapt / grpcio alone throughput: {ratio:.2f} (other load: {meter.background_cores} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
