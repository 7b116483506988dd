"""What a coordinator counts, and where refusals go.

`Stats` holds the counters and gauges (rounds committed, uploads by status, refusals by code, bytes in and
out, open streams by kind, connected clients, threads) as plain Python values; `serve_metrics` exposes
them, with the process's own (resident memory, CPU, open files), in the Prometheus text format on an HTTP
port (`fedadapt server start --metrics-port`), using prometheus_client, which is imported only then.

`RefusalLog` is where every refusal goes: it is counted at once (per code, and per run for the round
records and `run follow`), logged at a bounded rate, and written to the store (`refusals`, status
"refused") by a background thread in batches, refusals alike in everything but time folded into one row
with a count: a flood of refusals costs a few rows a second, not one write each.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger("fedadapt.server")

# name -> (help, label name or ""): every counter a coordinator keeps; exposed as fedadapt_<name>_total
COUNTERS: dict[str, tuple[str, str]] = {
    "rounds_committed": ("rounds committed to the store", ""),
    "uploads": ("uploads answered, by the status they were given", "status"),
    "refusals": ("uploads and calls refused, by code", "code"),
    "bytes_received": ("payload bytes received in uploads (whatever their fate)", ""),
    "bytes_sent": ("payload bytes sent in tasks and run downloads", ""),
}
MAX_PENDING_ROWS = 1000  # distinct refusal rows held between two writes; beyond, they are folded by code
LOG_PER_10S = 20  # refusal log lines per 10 seconds; the rest are summed up in one line


class Stats:
    """Thread-safe counters, open-stream gauges and callables that report a gauge when asked."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._streams: Counter[str] = Counter()
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {
            "threads": ("threads of the coordinator process", threading.active_count)}

    def inc(self, name: str, value: float = 1, label: str = "") -> None:
        if name not in COUNTERS:
            raise KeyError(name)
        with self._lock:
            self._counts[name, label] += value

    def count(self, name: str, label: str | None = None) -> float:
        """A counter's value: of one label, or summed over all of them."""
        with self._lock:
            return sum(v for (n, lab), v in self._counts.items() if n == name and (label is None or lab == label))

    @contextmanager
    def stream(self, kind: str):
        """Counts an open stream of `kind` (pull, push, follow, download) while the block runs."""
        with self._lock:
            self._streams[kind] += 1
        try:
            yield
        finally:
            with self._lock:
                self._streams[kind] -= 1

    def open_streams(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(v for k, v in self._streams.items() if kind is None or k == kind)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
            streams = dict(self._streams)
        return {"counts": counts, "streams": streams, "gauges": {k: f() for k, (_, f) in self.gauges.items()}}


def serve_metrics(stats: Stats, port: int, address: str = "127.0.0.1"):
    """Serve `stats` and the process's own metrics at http://ADDRESS:PORT/metrics; returns (server, port).
    Needs prometheus_client (the `server` extra)."""
    try:
        from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    except ImportError:
        from fedadapt.core.errors import ConfigError

        raise ConfigError("--metrics-port needs prometheus_client: pip install 'fedadapt[server]'") from None

    class Collector:
        def collect(self):
            snap = stats.snapshot()
            for name, (text, label) in COUNTERS.items():
                family = CounterMetricFamily(f"fedadapt_{name}", text, labels=[label] if label else None)
                values = {lab: v for (n, lab), v in snap["counts"].items() if n == name}
                if not label:
                    family.add_metric([], values.get("", 0))
                else:
                    for lab, v in sorted(values.items()):
                        family.add_metric([lab], v)
                yield family
            streams = GaugeMetricFamily("fedadapt_open_streams", "open gRPC streams, by kind", labels=["kind"])
            for kind in ("pull", "push", "follow", "download"):
                streams.add_metric([kind], snap["streams"].get(kind, 0))
            yield streams
            for name, value in snap["gauges"].items():
                yield GaugeMetricFamily(f"fedadapt_{name}", stats.gauges[name][0], value=value)

    registry = CollectorRegistry()
    registry.register(Collector())
    ProcessCollector(registry=registry)
    try:
        server, _thread = start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        from fedadapt.core.errors import FedadaptError

        raise FedadaptError(f"cannot serve metrics on {address}:{port}: {exc.strerror or exc}") from None
    return server, server.server_address[1]


@dataclass
class _Pending:
    count: int
    bytes_up: int
    first_at: datetime
    last_at: datetime


class RefusalLog:
    """Counts, logs (at a bounded rate) and stores every refusal. `store` may be None (nothing written: a
    simulation's loopback coordinator); `flush_s` is the most a refusal waits before it is written."""

    def __init__(self, store=None, stats: Stats | None = None, *, flush_s: float = 1.0):
        self.store = store
        self.stats = stats or Stats()
        self.flush_s = flush_s
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int, str, str, str], _Pending] = {}
        self._per_run: dict[str, Counter[str]] = {}
        self._taken: dict[str, Counter[str]] = {}  # per run: what the last round record already showed
        self._logged, self._window, self._suppressed = 0, time.monotonic(), 0
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        if store is not None:
            self._thread = threading.Thread(target=self._writer, name="refusals", daemon=True)
            self._thread.start()

    def record(self, run_id: str, rnd: int, client: str, code: str, reason: str, bytes_up: int = 0,
               peer: str = "") -> None:
        now = datetime.now(timezone.utc)
        reason = reason.splitlines()[0][:500] if reason else code
        with self._lock:
            self._per_run.setdefault(run_id, Counter())[code] += 1
            key = (run_id, rnd, client[:255], code, reason)
            if key not in self._pending and len(self._pending) >= MAX_PENDING_ROWS:
                key = (run_id, rnd, "", code, "(more refusals of this kind, folded into one row)")
            p = self._pending.get(key)
            if p is None:
                self._pending[key] = _Pending(1, bytes_up, now, now)
            else:
                p.count += 1
                p.bytes_up += bytes_up
                p.last_at = now
            speak = self._may_log()
        self.stats.inc("refusals", label=code)
        if speak:
            who = f"{client!r}" if client else "an unauthenticated caller"
            log.warning("refused %s%s: %s", who, f" ({peer})" if peer else "", reason)

    def counts(self, run_id: str) -> Counter[str]:
        """Refusals by code while `run_id` was active ("": while no run was)."""
        with self._lock:
            return Counter(self._per_run.get(run_id, {}))

    def take(self, run_id: str) -> dict[str, int]:
        """Refusals by code since the last `take` for this run (what a round record shows)."""
        with self._lock:
            now = Counter(self._per_run.get(run_id, {}))
            before = self._taken.get(run_id, Counter())
            self._taken[run_id] = now
            return {code: n for code, n in sorted((now - before).items()) if n}

    def flush(self) -> None:
        """Write what is pending now (the writer thread does this every `flush_s`)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending or self.store is None:
            return
        from fedadapt.server.store import RefusalRow

        rows = [RefusalRow(run_id, rnd, client, code, reason, p.count, p.bytes_up, p.first_at, p.last_at)
                for (run_id, rnd, client, code, reason), p in pending.items()]
        try:
            self.store.add_refusals(rows)
        except Exception as exc:  # the database is down: say so once per batch, keep serving
            log.error("could not record %d refusals: %s", sum(p.count for p in pending.values()), exc)

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()

    def _writer(self) -> None:
        while not self._closing:
            self._wake.wait(self.flush_s)
            self.flush()

    def _may_log(self) -> bool:
        now = time.monotonic()
        if now - self._window > 10.0:
            if self._suppressed:
                log.warning("... and %d more refusals in the last %.0fs (see the refusals table)", self._suppressed,
                            now - self._window)
            self._window, self._logged, self._suppressed = now, 0, 0
        if self._logged < LOG_PER_10S:
            self._logged += 1
            return True
        self._suppressed += 1
        return False
