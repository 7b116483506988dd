#!/usr/bin/env python3
"""Raw loopback baseline: one process sends N bytes to another over TCP on 127.0.0.1.

This is the "raw loopback socket copy" that the coordinator's upload throughput is compared
with (target: within 2x). The receiver is this process; the sender is a fresh child process
(the same file, run with ``--_sender``), so the bytes really cross a process boundary.

Per repeat, the receiver sends one "go" byte and times until all ``size_bytes`` have arrived
via ``recv_into`` into a buffer preallocated (and touched) before the timing; the sender
answers "go" with one ``sendall`` of a payload it built (and touched) beforehand. The timed
span therefore contains one tiny round trip (~0.1 ms) plus the transfer. Medians over the
repeats; MB/s uses MB = 10**6 bytes (MiB/s is reported too).

    from loopback_socket import measure
    measure(100 * 2**20, repeats=15)   # -> {"median_s": ..., "MBps_median": ..., ...}

    .venv/bin/python benchmarks/loopback_socket.py --size-mib 100 --repeats 15

Options: ``--send-chunk BYTES`` makes the sender call ``sendall`` per chunk (e.g. 3 MiB, the
size of fedadapt's payload chunks) instead of once; ``--json PATH`` (default
benchmarks/results/loopback_socket.json, written atomically). Uses only the standard library (and harness.py).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, CpuMeter, command_line, machine_facts, sys_value, utc_now, write_json  # noqa: E402

RESULTS_JSON = RESULTS / "loopback_socket.json"
MIB = 1024 * 1024


def _sender(port: int, size: int, repeats: int, chunk: int) -> None:
    payload = bytearray(size)
    for i in range(0, size, 4096):  # touch every page before any timing
        payload[i] = i & 0xFF
    payload = bytes(payload)
    view = memoryview(payload)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t_cpu = time.process_time()
        for _ in range(repeats):
            if s.recv(1) != b"g":
                raise SystemExit("sender: receiver went away")
            if chunk <= 0:
                s.sendall(view)
            else:
                for lo in range(0, size, chunk):
                    s.sendall(view[lo:lo + chunk])
        if s.recv(1) != b"q":
            raise SystemExit("sender: no final ack")
        s.sendall(json.dumps({"sender_cpu_s": time.process_time() - t_cpu}).encode())


def measure(size_bytes: int = 100 * MIB, repeats: int = 15, *, warmup: int = 2, send_chunk: int = 0,
            timeout: float = 300.0) -> dict:
    """Time ``repeats`` transfers of ``size_bytes`` from a child process over TCP loopback into a
    preallocated buffer; return medians and the raw per-repeat seconds."""
    buf = bytearray(size_bytes)
    for i in range(0, size_bytes, 4096):  # fault the receive buffer in: "preallocated"
        buf[i] = 1
    view = memoryview(buf)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(timeout)
    port = srv.getsockname()[1]
    total = warmup + repeats
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_sender", str(port),
                              str(size_bytes), str(total), str(send_chunk)])
    times: list[float] = []
    try:
        conn, _ = srv.accept()
        conn.settimeout(timeout)
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rcvbuf = conn.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            meter, w0, cpu0 = CpuMeter().start(), time.perf_counter(), time.process_time()
            for i in range(total):
                t0 = time.perf_counter()
                conn.sendall(b"g")
                got = 0
                while got < size_bytes:
                    n = conn.recv_into(view[got:], size_bytes - got)
                    if n == 0:
                        raise RuntimeError(f"sender closed after {got} of {size_bytes} bytes")
                    got += n
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times.append(dt)
            wall = time.perf_counter() - w0
            recv_cpu = time.process_time() - cpu0
            conn.sendall(b"q")
            tail = b""
            while True:
                part = conn.recv(4096)
                if not part:
                    break
                tail += part
        child.wait(timeout=timeout)
        other = meter.stop().other  # our own CPU includes the sender's once it has been waited for
    finally:
        srv.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode != 0:
        raise RuntimeError(f"sender exited {child.returncode}")
    sender = json.loads(tail.decode() or "{}")
    med = statistics.median(times)
    return {
        "size_bytes": size_bytes, "repeats": repeats, "warmup": warmup,
        "send_chunk_bytes": send_chunk or None,
        "median_s": round(med, 6), "min_s": round(min(times), 6), "max_s": round(max(times), 6),
        "MBps_median": round(size_bytes / med / 1e6, 1),
        "MiBps_median": round(size_bytes / med / MIB, 1),
        "MBps_best": round(size_bytes / min(times) / 1e6, 1),
        "runs_s": [round(t, 6) for t in times],
        "receiver_cpu_s": round(recv_cpu, 3), "sender_cpu_s": round(sender.get("sender_cpu_s", 0.0), 3),
        "so_rcvbuf_bytes": rcvbuf,
        "background_cores": round(other / wall, 3) if wall > 0 else None,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def _machine() -> dict:
    return {**machine_facts(), "python": sys.version.split()[0],
            "tcp_rmem": sys_value("/proc/sys/net/ipv4/tcp_rmem"), "tcp_wmem": sys_value("/proc/sys/net/ipv4/tcp_wmem")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_sender":
        _sender(int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=float, default=100.0)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--send-chunk", type=int, default=0, help="sendall per chunk of this many bytes (0: one sendall)")
    ap.add_argument("--sessions", type=int, default=3,
                    help="independent measure() calls (fresh processes); the headline is their median")
    ap.add_argument("--json", type=Path, default=RESULTS_JSON)
    args = ap.parse_args(argv)
    size = int(args.size_mib * MIB)
    sessions = []
    for i in range(args.sessions):
        r = measure(size, args.repeats, warmup=args.warmup, send_chunk=args.send_chunk)
        print(f"session {i + 1}/{args.sessions}: median {r['median_s'] * 1e3:.1f} ms = {r['MBps_median']:.0f} MB/s "
              f"(best {r['MBps_best']:.0f} MB/s), other load {r['background_cores']} cores", file=sys.stderr)
        sessions.append(r)
    all_runs = [t for s in sessions for t in s["runs_s"]]
    med = statistics.median(all_runs)
    data = {
        "benchmark": "loopback_socket",
        "started_utc": utc_now(),
        "command": command_line(),
        "method": ("receiver = this process, sender = child process; per repeat: 1-byte go, then "
                   "size bytes via sendall -> recv_into a preallocated, pre-faulted bytearray on "
                   "127.0.0.1; MB = 1e6 bytes; headline = median over all repeats of all sessions"),
        "size_bytes": size,
        "median_s": round(med, 6),
        "MBps_median": round(size / med / 1e6, 1),
        "MiBps_median": round(size / med / MIB, 1),
        "session_MBps_medians": [s["MBps_median"] for s in sessions],
        "machine": _machine(),
        "sessions": sessions,
    }
    write_json(args.json, data)
    print(json.dumps({k: data[k] for k in ("size_bytes", "median_s", "MBps_median", "MiBps_median",
                                           "session_MBps_medians")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
