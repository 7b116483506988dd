"""A throwaway PostgreSQL cluster for tests: initdb in a temp dir, a free port, stopped and deleted after.

`initdb` refuses to run as root, so as root the cluster belongs to the `postgres` user the Debian
package creates. Every subprocess is bounded in time so a broken install fails the tests, never hangs.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

USER = "fedadapt"
TIMEOUT_S = 60
INSTALL_HINT = ("PostgreSQL is not installed (no initdb/pg_ctl on PATH or under /usr/lib/postgresql/*/bin); "
                "install it with `apt-get install -y postgresql` (the CI script .ci/run does)")


class PostgresUnavailable(RuntimeError):
    pass


def find_bin_dir() -> Path:
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key)
    for d in reversed(candidates):  # newest installed version first
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    raise PostgresUnavailable(INSTALL_HINT)


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.name
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_owner() -> list[str]:
    # initdb and postgres refuse root; run them as the postgres user, who owns the temp dir.
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _run(cmd: list[str], what: str, log: Path | None = None) -> None:
    try:
        done = subprocess.run(_as_owner() + cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PostgresUnavailable(f"{what} did not finish within {TIMEOUT_S} s{_tail(log)}") from None
    if done.returncode != 0:
        out = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise PostgresUnavailable(f"{what} failed (exit {done.returncode}): {' | '.join(out)}{_tail(log)}")


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    lines = log.read_text(errors="replace").strip().splitlines()[-5:]
    return " | server log: " + " | ".join(lines) if lines else ""


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """Yield `postgresql+psycopg://fedadapt@127.0.0.1:PORT/fedadapt` for a fresh cluster."""
    bin_dir = find_bin_dir()
    root = Path(tempfile.mkdtemp(prefix="fedadapt-pg-"))
    data, log = root / "data", root / "server.log"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    started = False
    try:
        # Durability is pointless for a throwaway cluster: no fsync makes initdb and tests faster.
        _run([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", USER, "--no-sync", "-E", "UTF8"],
             "initdb")
        port = _start(bin_dir, data, root, log)
        started = True
        url = f"postgresql+psycopg://{USER}@127.0.0.1:{port}/fedadapt"
        _admin(url, "CREATE DATABASE fedadapt")
        yield url
    finally:
        if started:
            try:
                _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], "pg_ctl stop")
            except PostgresUnavailable:
                pass  # the directory is removed anyway; an orphan server dies with its data dir
        shutil.rmtree(root, ignore_errors=True)


def _start(bin_dir: Path, data: Path, sock_dir: Path, log: Path) -> int:
    options = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    last: PostgresUnavailable | None = None
    for _ in range(3):  # another process may grab the free port between probe and bind
        port = free_port()
        cmd = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", str(TIMEOUT_S - 5),
               "-o", f"-p {port} -k {sock_dir} -c listen_addresses=127.0.0.1 {options}", "start"]
        try:
            _run(cmd, "pg_ctl start", log)
            return port
        except PostgresUnavailable as e:
            last = e
    assert last is not None
    raise last


def _admin(url: str, sql: str) -> None:
    """Run one statement outside a transaction (CREATE/DROP DATABASE need that) on the `postgres` db."""
    import psycopg

    host_port = url.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    with psycopg.connect(host=host, port=int(port), user=USER, dbname="postgres", autocommit=True,
                         connect_timeout=10) as conn:
        conn.execute(sql)


def create_database(cluster_url: str) -> str:
    """A new, empty database on the cluster; returns its URL."""
    name = "t_" + uuid.uuid4().hex[:16]
    _admin(cluster_url, f"CREATE DATABASE {name}")
    return cluster_url.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str) -> None:
    """Best effort: FORCE ends sessions a test left open (PostgreSQL 13+)."""
    name = url.rsplit("/", 1)[1]
    try:
        _admin(url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    except Exception:
        pass  # the whole cluster is deleted at the end of the session anyway
