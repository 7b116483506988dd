"""The coordinator's durable state: clients, runs, committed rounds, who took part in them and the
client-DP privacy ledger (epsilon each client had spent after each round it trained in).

SQLAlchemy 2.x: a SQLite file by default, any SQLAlchemy URL (PostgreSQL) in production. Tensors live
in content-addressed blob files (`blobs.py`); the database only names them by sha256. A round is
committed by writing its blobs first and then ONE transaction that inserts the round and its
participations and advances `runs.round`: after a crash the database shows whole rounds or none.

Every public method opens its own session, so one Store can be shared by the coordinator's threads.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Connection,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
    exc,
    func,
    insert,
    select,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from fedadapt.core import codec
from fedadapt.core.errors import AuthError

from .blobs import BlobStore, StoreError

__all__ = ["SCHEMA_VERSION", "ClientRow", "Commit", "LedgerEntry", "Participation", "RefusalRow", "RunRow", "Store",
           "StoreError", "hash_token", "normalize_url"]

SCHEMA_VERSION = 3
RUN_STATUSES = ("queued", "running", "stopped", "finished", "failed")
# "no-result" (asked, never answered) comes from the round engine, "refused" from the hub (e.g. an
# upload for a run or round the coordinator is not running).
PARTICIPATION_STATUSES = ("accepted", "rejected", "late", "failed", "no-result", "refused")
SQLITE_BUSY_TIMEOUT_S = 30.0
_MAX_NAME = 255


def hash_token(token: str) -> str:
    # Tokens are random secrets made by the coordinator, so a plain sha256 resists guessing; a slow
    # password hash would only slow down every client connection.
    if not isinstance(token, str) or not token:
        raise StoreError("a client token must be a non-empty string")
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _now() -> datetime:
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class ClientRow:
    name: str
    added_at: datetime
    revoked_at: datetime | None
    last_seen: datetime | None


@dataclass(frozen=True)
class RunRow:
    run_id: str
    name: str
    config_toml: str
    status: str
    rounds: int
    round: int
    created_at: datetime
    updated_at: datetime
    error: str


@dataclass(frozen=True)
class Participation:
    client: str
    status: str
    reason: str = ""
    bytes_up: int = 0
    bytes_down: int = 0
    round: int | None = field(default=None, compare=False)  # filled when read back; ignored on commit


@dataclass(frozen=True)
class RefusalRow:
    """Uploads (or calls) the coordinator did not take, alike ones between two writes counted in one row: the
    run that was active ("" when none), its round then, the client ("" when it could not authenticate), a
    code for programs and the reason the sender was given."""

    run_id: str
    round: int
    client: str
    code: str
    reason: str
    count: int = 1
    bytes_up: int = 0
    first_at: datetime | None = None
    last_at: datetime | None = None
    status: str = "refused"


@dataclass(frozen=True)
class LedgerEntry:
    """Client DP: the epsilon a client had spent after a round it trained in (its own opacus accountant), at delta."""

    client: str
    epsilon: float
    delta: float
    round: int | None = field(default=None, compare=False)  # filled when read back; ignored on commit


@dataclass
class Commit:
    round: int
    tensors: dict[str, torch.Tensor]
    aux: dict[str, torch.Tensor]
    strategy_state: dict[str, Any]
    record: dict[str, Any]


# -------------------------------------------------------------------------------------------- schema


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else value.astimezone(timezone.utc)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    pass


class _SchemaVersion(Base):
    __tablename__ = "schema_version"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1: a single row
    version: Mapped[int] = mapped_column(Integer)


class _Client(Base):
    __tablename__ = "clients"
    name: Mapped[str] = mapped_column(String(_MAX_NAME), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    added_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime)


class _Run(Base):
    __tablename__ = "runs"
    __table_args__ = (CheckConstraint(_one_of("status", RUN_STATUSES), name="runs_status"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # creation order
    run_id: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(Text)
    config_toml: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    rounds: Mapped[int] = mapped_column(Integer)
    round: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    error: Mapped[str] = mapped_column(Text, default="")


class _Round(Base):
    __tablename__ = "rounds"
    run_id: Mapped[str] = mapped_column(String(32), ForeignKey("runs.run_id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    state_blob: Mapped[str] = mapped_column(String(64))
    aux_blob: Mapped[str] = mapped_column(String(64))
    strategy_state_json: Mapped[str] = mapped_column(Text)
    record_json: Mapped[str] = mapped_column(Text)
    committed_at: Mapped[datetime] = mapped_column(UTCDateTime)


class _Participation(Base):
    # No CHECK on status here (unlike runs): new outcomes are likely, and should not need a migration.
    __tablename__ = "participations"
    __table_args__ = (
        ForeignKeyConstraint(["run_id", "round"], ["rounds.run_id", "rounds.round"]),
        Index("participations_run_round", "run_id", "round"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(32))
    round: Mapped[int] = mapped_column(Integer)
    client: Mapped[str] = mapped_column(String(_MAX_NAME))
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_down: Mapped[int] = mapped_column(BigInteger, default=0)


class _PrivacyLedger(Base):
    __tablename__ = "privacy_ledger"
    __table_args__ = (ForeignKeyConstraint(["run_id", "round"], ["rounds.run_id", "rounds.round"]),)
    run_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    client: Mapped[str] = mapped_column(String(_MAX_NAME), primary_key=True)
    epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)


class _Refusal(Base):
    # Not tied to a committed round (a refusal may come while no run is active, or in a round never
    # committed), so no foreign key; written as refusals happen, in batches.
    __tablename__ = "refusals"
    __table_args__ = (Index("refusals_run", "run_id", "round"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    status: Mapped[str] = mapped_column(String(16), default="refused")
    run_id: Mapped[str] = mapped_column(String(64), default="")
    round: Mapped[int] = mapped_column(Integer, default=0)
    client: Mapped[str] = mapped_column(String(_MAX_NAME), default="")
    code: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text, default="")
    count: Mapped[int] = mapped_column(Integer, default=1)
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0)
    first_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_at: Mapped[datetime] = mapped_column(UTCDateTime)


def _create_v1(conn: Connection) -> None:
    # Version 1 tables. A later version adds its own step; never edit this one once released.
    tables = [m.__table__ for m in (_Client, _Run, _Round, _Participation)]
    Base.metadata.create_all(conn, tables=tables)


def _create_v2(conn: Connection) -> None:
    # Version 2: the client-DP privacy ledger, one row per client per round it trained in.
    Base.metadata.create_all(conn, tables=[_PrivacyLedger.__table__])


def _create_v3(conn: Connection) -> None:
    # Version 3: refused uploads and calls (status "refused", a code and the reason the sender was given).
    Base.metadata.create_all(conn, tables=[_Refusal.__table__])


_MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _create_v1, 2: _create_v2, 3: _create_v3}


# -------------------------------------------------------------------------------------------- engine


def normalize_url(url: str | Path) -> URL:
    """A SQLAlchemy URL; a plain path means a SQLite file, `postgresql://` means psycopg 3."""
    if isinstance(url, Path) or "://" not in url:
        path = Path(url).expanduser().resolve()
        return URL.create("sqlite", database=str(path))
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        raise StoreError(f"not a database URL or path: {url!r}") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _is_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _make_engine(url: URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if _is_memory(url):
        # One shared connection (a second one would see another, empty database); Store serialises it.
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # We issue BEGIN ourselves: the driver's implicit BEGIN would leave DDL outside transactions.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the committing writer
        cur.execute("PRAGMA synchronous=FULL")  # a committed round survives power loss, not just kill -9
        cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # A writer takes the lock up front: a deferred read-then-write transaction could fail with
        # SQLITE_BUSY_SNAPSHOT instead of waiting when another thread commits in between.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("fedadapt_write") else "BEGIN")

    return engine


def _one_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --------------------------------------------------------------------------------------------- store


class Store:
    def __init__(self, url: str | Path, blob_dir: Path | str):
        parsed = normalize_url(url)
        self.url: str = parsed.render_as_string(hide_password=False)
        self._shown_url = parsed.render_as_string(hide_password=True)
        self.blobs = BlobStore(blob_dir)
        try:
            self._engine = _make_engine(parsed)
        except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as e:
            raise StoreError(f"cannot use database {self._shown_url}: {_one_line(e)}") from None
        self._write_engine = self._engine.execution_options(fedadapt_write=True)
        self._lock = threading.RLock() if _is_memory(parsed) else nullcontext()
        try:
            self._migrate()
        except BaseException:
            self._engine.dispose()
            raise

    def __repr__(self) -> str:
        return f"Store({self._shown_url!r}, {str(self.blobs.root)!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._engine.dispose()

    # -- plumbing

    @contextmanager
    def _errors(self) -> Iterator[None]:
        # Lost connections, a locked or full database: one line for the user, not a driver traceback.
        try:
            yield
        except exc.OperationalError as e:
            raise StoreError(f"database {self._shown_url}: {_one_line(e)}") from None

    @contextmanager
    def _session(self, *, write: bool = False) -> Iterator[Session]:
        engine = self._write_engine if write else self._engine
        with self._lock, self._errors(), Session(engine, expire_on_commit=False) as s, s.begin():
            yield s

    def _migrate(self) -> None:
        # One transaction: a crash mid-migration leaves the previous version, never half of the next.
        with self._lock, self._errors(), self._write_engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # serialise coordinators opening a fresh database at once
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7741500001)")
            _SchemaVersion.__table__.create(conn, checkfirst=True)
            found = conn.execute(select(_SchemaVersion.version).where(_SchemaVersion.id == 1)).scalar()
            current = found or 0
            if current > SCHEMA_VERSION:
                raise StoreError(f"database {self._shown_url} has schema version {current}, newer than this "
                                 f"fedadapt supports ({SCHEMA_VERSION}); upgrade fedadapt to open it")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                _MIGRATIONS[version](conn)
            if found is None:
                conn.execute(_SchemaVersion.__table__.insert().values(id=1, version=SCHEMA_VERSION))
            elif current != SCHEMA_VERSION:
                conn.execute(_SchemaVersion.__table__.update().where(_SchemaVersion.id == 1)
                             .values(version=SCHEMA_VERSION))

    def schema_version(self) -> int:
        with self._session() as s:
            return s.execute(select(_SchemaVersion.version).where(_SchemaVersion.id == 1)).scalar_one()

    @staticmethod
    def _client(s: Session, name: str, *, lock: bool = False) -> _Client | None:
        q = select(_Client).where(_Client.name == name)
        return s.execute(q.with_for_update() if lock else q).scalar_one_or_none()

    @staticmethod
    def _run(s: Session, run_id: str, *, lock: bool = False) -> _Run:
        q = select(_Run).where(_Run.run_id == run_id)
        run = s.execute(q.with_for_update() if lock else q).scalar_one_or_none()
        if run is None:
            raise StoreError(f"unknown run {run_id!r}")
        return run

    # -- client registry

    def add_client(self, name: str, token: str) -> None:
        _check_name("client name", name)
        token_hash = hash_token(token)
        with self._session(write=True) as s:
            row = self._client(s, name, lock=True)
            if row is None:
                s.add(_Client(name=name, token_hash=token_hash, added_at=_now()))
                _flush(s, f"client {name!r} is already registered")
            elif row.revoked_at is None:
                raise StoreError(f"client {name!r} is already registered; revoke it first to issue a new token")
            else:  # re-admitting a revoked client: only the new token works from now on
                row.token_hash, row.revoked_at, row.added_at = token_hash, None, _now()

    def revoke_client(self, name: str) -> None:
        with self._session(write=True) as s:
            row = self._client(s, name, lock=True)
            if row is None:
                raise StoreError(f"client {name!r} is not registered")
            if row.revoked_at is None:
                row.revoked_at = _now()

    def list_clients(self) -> list[ClientRow]:
        with self._session() as s:
            rows = s.execute(select(_Client).order_by(_Client.name)).scalars()
            return [ClientRow(r.name, r.added_at, r.revoked_at, r.last_seen) for r in rows]

    def check_client(self, name: str, token: str) -> None:
        with self._session() as s:
            row = self._client(s, name)
            if row is None:
                raise AuthError(f"client {name!r} is not registered on this coordinator")
            if row.revoked_at is not None:
                raise AuthError(f"client {name!r} is revoked")
            expected = row.token_hash
        presented = hash_token(token) if isinstance(token, str) and token else ""
        if not hmac.compare_digest(expected, presented):
            raise AuthError(f"wrong credential for client {name!r}")

    def touch_client(self, name: str) -> None:
        with self._session(write=True) as s:
            row = self._client(s, name, lock=True)
            if row is None:
                raise StoreError(f"client {name!r} is not registered")
            row.last_seen = _now()

    def touch_clients(self, seen: Mapping[str, datetime]) -> None:
        """Set `last_seen` of many clients at once (names that are not registered are skipped)."""
        if not seen:
            return
        with self._session(write=True) as s:
            for row in s.execute(select(_Client).where(_Client.name.in_(list(seen)))).scalars():
                at = seen[row.name]
                if row.last_seen is None or row.last_seen < at:
                    row.last_seen = at

    def registry(self) -> dict[str, tuple[str, bool]]:
        """Every registered client: name -> (sha256 of its token, revoked). One query, for an in-memory check."""
        with self._session() as s:
            rows = s.execute(select(_Client.name, _Client.token_hash, _Client.revoked_at))
            return {name: (token_hash, revoked_at is not None) for name, token_hash, revoked_at in rows}

    # -- refusals

    def add_refusals(self, rows: Sequence[RefusalRow]) -> None:
        if not rows:
            return
        now = _now()
        with self._session(write=True) as s:
            s.execute(insert(_Refusal), [
                {"status": r.status, "run_id": str(r.run_id)[:64], "round": max(int(r.round), 0),
                 "client": str(r.client)[:_MAX_NAME], "code": str(r.code)[:32], "reason": str(r.reason)[:2000],
                 "count": max(int(r.count), 1), "bytes_up": min(max(int(r.bytes_up), 0), 2**63 - 1),
                 "first_at": r.first_at or now, "last_at": r.last_at or now} for r in rows])

    def refusals(self, run_id: str | None = None) -> list[RefusalRow]:
        """Recorded refusals, oldest first; those of one run (\"\" for those while no run was active) if given."""
        with self._session() as s:
            q = select(_Refusal)
            if run_id is not None:
                q = q.where(_Refusal.run_id == run_id)
            return [RefusalRow(r.run_id, r.round, r.client, r.code, r.reason, r.count, r.bytes_up, r.first_at,
                               r.last_at, r.status) for r in s.execute(q.order_by(_Refusal.id)).scalars()]

    def refusal_counts(self, run_id: str) -> dict[str, int]:
        """How many refusals of each code were recorded while `run_id` was active."""
        with self._session() as s:
            q = (select(_Refusal.code, func.sum(_Refusal.count)).where(_Refusal.run_id == run_id)
                 .group_by(_Refusal.code))
            return {code: int(n) for code, n in s.execute(q)}

    # -- runs

    def create_run(self, name: str, config_toml: str, rounds: int) -> str:
        _check_int("rounds", rounds, minimum=1)
        if not isinstance(config_toml, str):
            raise StoreError("config_toml must be a string")
        for _ in range(5):  # 32 random bits: a collision is rare, and retried
            run_id = "run-" + secrets.token_hex(4)
            now = _now()
            try:
                with self._session(write=True) as s:
                    s.add(_Run(run_id=run_id, name=str(name), config_toml=config_toml, status="queued",
                               rounds=rounds, round=0, created_at=now, updated_at=now, error=""))
                    s.flush()
                return run_id
            except exc.IntegrityError:
                continue
        raise StoreError("could not allocate a unique run id")

    def get_run(self, run_id: str) -> RunRow:
        with self._session() as s:
            return _run_row(self._run(s, run_id))

    def list_runs(self) -> list[RunRow]:
        with self._session() as s:
            return [_run_row(r) for r in s.execute(select(_Run).order_by(_Run.id.desc())).scalars()]

    def set_status(self, run_id: str, status: str, error: str = "") -> RunRow:
        if status not in RUN_STATUSES:
            raise StoreError(f"unknown run status {status!r}; expected one of {', '.join(RUN_STATUSES)}")
        with self._session(write=True) as s:
            run = self._run(s, run_id, lock=True)
            run.status, run.error, run.updated_at = status, str(error), _now()
            s.flush()
            return _run_row(run)

    def runs_with_status(self, *statuses: str) -> list[RunRow]:
        unknown = [st for st in statuses if st not in RUN_STATUSES]
        if unknown:
            raise StoreError(f"unknown run status {unknown[0]!r}; expected one of {', '.join(RUN_STATUSES)}")
        with self._session() as s:
            q = select(_Run).where(_Run.status.in_(statuses)).order_by(_Run.id)
            return [_run_row(r) for r in s.execute(q).scalars()]

    # -- rounds

    def commit_round(self, run_id: str, rnd: int, tensors: Mapping[str, torch.Tensor],
                     aux: Mapping[str, torch.Tensor], strategy_state: dict, record: dict,
                     participations: list[Participation], ledger: Sequence[LedgerEntry] = ()) -> None:
        _check_int("round", rnd, minimum=1)
        state_json = _dumps("strategy_state", strategy_state)
        record_json = _dumps("record", record)
        parts = [_check_participation(p) for p in participations]
        entries = [_check_ledger_entry(e) for e in ledger]
        self._expect_next(run_id, rnd)  # fail before writing blobs for a commit that cannot happen
        # Blobs first, outside the transaction: if we die after this, they are unreferenced files only.
        state_blob = self.blobs.put(codec.encode(tensors))
        aux_blob = self.blobs.put(codec.encode(aux))
        with self._session(write=True) as s:
            run = self._run(s, run_id, lock=True)
            _require_next(run, rnd)  # re-checked under the lock: the pre-check may be stale
            now = _now()
            s.add(_Round(run_id=run_id, round=rnd, state_blob=state_blob, aux_blob=aux_blob,
                         strategy_state_json=state_json, record_json=record_json, committed_at=now))
            _flush(s, f"round {rnd} of run {run_id!r} was already committed")  # participations reference it
            if parts:  # one executemany, not an ORM object per client (50+ clients per round)
                s.execute(insert(_Participation), [
                    {"run_id": run_id, "round": rnd, "client": p.client, "status": p.status, "reason": p.reason,
                     "bytes_up": p.bytes_up, "bytes_down": p.bytes_down} for p in parts])
            if entries:
                s.execute(insert(_PrivacyLedger), [{"run_id": run_id, "round": rnd, "client": e.client,
                                                    "epsilon": e.epsilon, "delta": e.delta} for e in entries])
            run.round, run.updated_at = rnd, now
            s.flush()

    def _expect_next(self, run_id: str, rnd: int) -> None:
        with self._session() as s:
            _require_next(self._run(s, run_id), rnd)

    def last_commit(self, run_id: str) -> Commit | None:
        with self._session() as s:
            row = self._last_round(s, run_id)
            if row is None:
                return None
            rnd, state_blob, aux_blob = row.round, row.state_blob, row.aux_blob
            state, record = json.loads(row.strategy_state_json), json.loads(row.record_json)
        return Commit(rnd, self._tensors(state_blob), self._tensors(aux_blob), state, record)

    def records(self, run_id: str, after: int = 0) -> list[tuple[int, dict]]:
        with self._session() as s:
            self._run(s, run_id)
            q = select(_Round.round, _Round.record_json).where(_Round.run_id == run_id, _Round.round > after)
            return [(r, json.loads(j)) for r, j in s.execute(q.order_by(_Round.round))]

    def commit_times(self, run_id: str) -> list[float]:
        """POSIX time of each committed round, in round order (round periods for benchmarks)."""
        with self._session() as s:
            self._run(s, run_id)
            q = select(_Round.committed_at).where(_Round.run_id == run_id).order_by(_Round.round)
            return [t.timestamp() for (t,) in s.execute(q)]

    def participations(self, run_id: str, rnd: int | None = None) -> list[Participation]:
        with self._session() as s:
            self._run(s, run_id)
            q = select(_Participation).where(_Participation.run_id == run_id)
            if rnd is not None:
                q = q.where(_Participation.round == rnd)
            rows = s.execute(q.order_by(_Participation.round, _Participation.id)).scalars()
            return [Participation(p.client, p.status, p.reason, p.bytes_up, p.bytes_down, p.round) for p in rows]

    def privacy_ledger(self, run_id: str) -> list[LedgerEntry]:
        """Every committed ledger entry of a run, by round then client."""
        with self._session() as s:
            self._run(s, run_id)
            q = select(_PrivacyLedger).where(_PrivacyLedger.run_id == run_id)
            rows = s.execute(q.order_by(_PrivacyLedger.round, _PrivacyLedger.client)).scalars()
            return [LedgerEntry(e.client, e.epsilon, e.delta, e.round) for e in rows]

    def model_path(self, run_id: str) -> Path | None:
        last = self.last_model(run_id)
        return None if last is None else last[1]

    def last_model(self, run_id: str) -> tuple[int, Path] | None:
        """The last committed round of a run and the path of its global tensors (safetensors)."""
        with self._session() as s:
            row = self._last_round(s, run_id)
            return None if row is None else (row.round, self.blobs.path(row.state_blob))

    def _last_round(self, s: Session, run_id: str) -> _Round | None:
        run = self._run(s, run_id)
        if run.round == 0:
            return None
        return s.get(_Round, (run_id, run.round))

    def _tensors(self, digest: str) -> dict[str, torch.Tensor]:
        data = self.blobs.get(digest)  # verified against its sha256, so it is what we wrote
        return codec.decode(data, max_bytes=max(len(data), 1))


# ------------------------------------------------------------------------------------------- helpers


def _run_row(r: _Run) -> RunRow:
    return RunRow(r.run_id, r.name, r.config_toml, r.status, r.rounds, r.round, r.created_at, r.updated_at,
                  r.error or "")


def _require_next(run: _Run, rnd: int) -> None:
    if rnd != run.round + 1:
        raise StoreError(f"cannot commit round {rnd} of run {run.run_id!r}: the next round to commit is "
                         f"{run.round + 1}")


def _flush(s: Session, conflict: str) -> None:
    try:
        s.flush()
    except exc.IntegrityError:
        raise StoreError(conflict) from None


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not name.strip() or len(name) > _MAX_NAME:
        raise StoreError(f"{what} must be a non-empty string of at most {_MAX_NAME} characters, got {name!r}")


def _check_int(what: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise StoreError(f"{what} must be an integer >= {minimum}, got {value!r}")


def _check_participation(p: Participation) -> Participation:
    if not isinstance(p, Participation):
        raise StoreError(f"participations must be Participation objects, got {type(p).__name__}")
    _check_name("participation client", p.client)
    if p.status not in PARTICIPATION_STATUSES:
        raise StoreError(f"participation status {p.status!r} of client {p.client!r} is not one of "
                         f"{', '.join(PARTICIPATION_STATUSES)}")
    _check_int("bytes_up", p.bytes_up, minimum=0)
    _check_int("bytes_down", p.bytes_down, minimum=0)
    return p


def _check_ledger_entry(e: LedgerEntry) -> LedgerEntry:
    if not isinstance(e, LedgerEntry):
        raise StoreError(f"ledger entries must be LedgerEntry objects, got {type(e).__name__}")
    _check_name("ledger client", e.client)
    if not (isinstance(e.epsilon, float) and e.epsilon >= 0 and math.isfinite(e.epsilon) and 0 < e.delta < 1):
        raise StoreError(f"ledger entry of client {e.client!r}: epsilon must be finite >= 0 and delta in (0, 1), "
                         f"got {e.epsilon!r}, {e.delta!r}")
    return e


def _dumps(what: str, value: Any) -> str:
    if not isinstance(value, dict):
        raise StoreError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        # NaN/Inf are written as Python's json does (NaN, Infinity) and read back identically: a
        # diverged loss must not make a round uncommittable.
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise StoreError(f"{what} is not JSON-serialisable: {e}") from None

