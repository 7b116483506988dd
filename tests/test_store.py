"""The coordinator's store, on SQLite and PostgreSQL: registry, runs, atomic round commits, durability."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text

from fedadapt.core import codec
from fedadapt.core.errors import AuthError, FedadaptError
from fedadapt.server.blobs import BlobStore
from fedadapt.server.store import SCHEMA_VERSION, Participation, Store, StoreError, hash_token, normalize_url


@pytest.fixture
def store(db_url, tmp_path):
    s = Store(db_url, tmp_path / "blobs")
    yield s
    s.close()


def tensors(rnd: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rnd)
    return {"a": torch.randn(4, 3, dtype=torch.float64, generator=g),
            "b": torch.randn(5, dtype=torch.float32, generator=g)}


def commit(store: Store, run_id: str, rnd: int, parts: list[Participation] | None = None) -> None:
    store.commit_round(run_id, rnd, tensors(rnd), {"m": torch.full((2,), float(rnd))}, {"seed": rnd},
                       {"round": rnd, "loss": rnd / 4}, parts or [Participation("c1", "accepted", "", 10, 20)])


def bitwise_equal(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
    return x.keys() == y.keys() and all(
        x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
        and x[k].contiguous().view(torch.uint8).equal(y[k].contiguous().view(torch.uint8)) for k in x)


# ------------------------------------------------------------------------------------------- blobs


def test_blob_store_is_content_addressed_and_verified(tmp_path):
    blobs = BlobStore(tmp_path)
    digest = blobs.put(b"hello")
    assert blobs.put(b"hello") == digest == hash_token("hello")  # same content, same name, no rewrite
    assert blobs.path(digest) == tmp_path / digest[:2] / digest
    assert blobs.get(digest) == b"hello"
    assert not list(tmp_path.rglob(".tmp-*"))
    blobs.path(digest).write_bytes(b"hellO")
    with pytest.raises(StoreError, match="corrupted"):
        blobs.get(digest)
    blobs.path(digest).unlink()
    with pytest.raises(StoreError, match="missing"):
        blobs.get(digest)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "ab", "A" * 64, "g" * 64, "a" * 63 + "/", "a" * 65, None])
def test_blob_store_rejects_bad_digests(tmp_path, bad):
    with pytest.raises(StoreError, match="invalid blob digest"):
        BlobStore(tmp_path).get(bad)


def test_urls(tmp_path):
    assert normalize_url(tmp_path / "x.db").render_as_string() == f"sqlite:///{tmp_path / 'x.db'}"
    assert normalize_url(str(tmp_path / "x.db")).drivername == "sqlite"
    assert normalize_url("postgresql://u@h:5/d").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h:5/d").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/d").drivername == "postgresql+psycopg"
    with pytest.raises(StoreError, match="not a database URL"):
        normalize_url("::://")
    with pytest.raises(StoreError, match="cannot use database"):
        Store("nosuchdialect://x/y", tmp_path / "blobs")
    s = Store(tmp_path / "sub" / "plain.db", tmp_path / "blobs")  # a plain path is a SQLite file
    assert s.url.startswith("sqlite:///") and (tmp_path / "sub" / "plain.db").exists()
    s.close()


def test_store_error_is_a_user_error():
    assert issubclass(StoreError, FedadaptError)


# ---------------------------------------------------------------------------------------- registry


def test_client_registry(store):
    store.add_client("alice", "tok-a")
    store.add_client("bob", "tok-b")
    store.check_client("alice", "tok-a")
    with pytest.raises(AuthError, match="^wrong credential for client 'alice'$"):
        store.check_client("alice", "tok-b")
    with pytest.raises(AuthError, match="^client 'carol' is not registered on this coordinator$"):
        store.check_client("carol", "x")
    with pytest.raises(StoreError, match="already registered"):
        store.add_client("alice", "other")
    store.check_client("alice", "tok-a")  # a refused re-add changed nothing

    store.revoke_client("alice")
    with pytest.raises(AuthError, match="^client 'alice' is revoked$"):
        store.check_client("alice", "tok-a")
    store.add_client("alice", "tok-new")  # re-admitted with a new token; the old one is dead
    store.check_client("alice", "tok-new")
    with pytest.raises(AuthError, match="wrong credential"):
        store.check_client("alice", "tok-a")

    with pytest.raises(StoreError, match="not registered"):
        store.revoke_client("carol")
    with pytest.raises(StoreError, match="not registered"):
        store.touch_client("carol")
    store.touch_client("bob")
    rows = {r.name: r for r in store.list_clients()}
    assert list(rows) == ["alice", "bob"]
    assert rows["alice"].revoked_at is None and rows["alice"].last_seen is None
    assert rows["bob"].last_seen is not None and rows["bob"].last_seen >= rows["bob"].added_at
    assert rows["bob"].added_at.tzinfo is not None


def test_tokens_are_stored_hashed(store, db_url):
    store.add_client("alice", "secret-token")
    engine = create_engine(normalize_url(db_url))
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT token_hash FROM clients")).scalar_one()
    engine.dispose()
    assert stored == hash_token("secret-token") and "secret-token" not in stored


# -------------------------------------------------------------------------------------------- runs


def test_run_lifecycle(store):
    a = store.create_run("first", "rounds = 3\n", 3)
    b = store.create_run("second", "x = 1\n", 5)
    assert a != b and a.startswith("run-") and len(a) == 12
    run = store.get_run(a)
    assert (run.name, run.config_toml, run.status, run.rounds, run.round, run.error) == \
        ("first", "rounds = 3\n", "queued", 3, 0, "")
    assert [r.run_id for r in store.list_runs()] == [b, a]
    assert [r.run_id for r in store.runs_with_status("queued")] == [a, b]

    running = store.set_status(a, "running")
    assert running.status == "running" and running.updated_at >= run.updated_at
    store.set_status(b, "failed", error="client pool empty")
    assert store.get_run(b).error == "client pool empty"
    assert [r.run_id for r in store.runs_with_status("running", "failed")] == [a, b]
    assert store.runs_with_status("queued") == []

    with pytest.raises(StoreError, match="unknown run 'run-nope'"):
        store.get_run("run-nope")
    with pytest.raises(StoreError, match="unknown run status 'paused'"):
        store.set_status(a, "paused")
    with pytest.raises(StoreError, match="unknown run status"):
        store.runs_with_status("done")
    with pytest.raises(StoreError, match="rounds must be an integer"):
        store.create_run("x", "", 0)
    for call in (store.last_commit, store.records, store.participations, store.model_path):
        with pytest.raises(StoreError, match="unknown run"):
            call("run-nope")


# ------------------------------------------------------------------------------------------ rounds


def test_commit_round_trips_bitwise(store):
    run_id = store.create_run("r", "", 3)
    assert store.last_commit(run_id) is None and store.model_path(run_id) is None
    t = {"w64": torch.randn(7, 3, dtype=torch.float64), "w32": torch.randn(11, dtype=torch.float32),
         "tiny": torch.tensor([5e-324, -0.0, 1e308], dtype=torch.float64)}  # subnormal, signed zero
    aux = {"momentum": torch.randn(7, 3, dtype=torch.float64), "step": torch.tensor([3], dtype=torch.int64),
           "half": torch.randn(4, dtype=torch.bfloat16)}
    state = {"rng": [1, 2, 3], "ledger": {"eps": 0.5, "delta": 1e-5}, "name": "fedavg"}
    record = {"round": 1, "loss": 0.123456789012345678, "accuracy": None, "clients": ["c1", "c2"],
              "rejected": {"c3": "tensor 'w' contains NaN or Inf"}, "strategy": {}}
    parts = [Participation("c1", "accepted", "", 100, 200), Participation("c2", "accepted", "", 101, 200),
             Participation("c3", "rejected", "tensor 'w' contains NaN or Inf", 99, 200),
             Participation("c4", "late", "arrived after the deadline", 0, 200),
             Participation("c5", "no-result", "", 0, 200)]
    store.commit_round(run_id, 1, t, aux, state, record, parts)

    got = store.last_commit(run_id)
    assert got.round == 1 and bitwise_equal(got.tensors, t) and bitwise_equal(got.aux, aux)
    assert got.strategy_state == state and got.record == record
    assert store.get_run(run_id).round == 1
    assert store.participations(run_id, 1) == parts
    assert all(p.round == 1 for p in store.participations(run_id))
    assert bitwise_equal(codec.decode(store.model_path(run_id).read_bytes()), t)

    commit(store, run_id, 2, [Participation("c1", "failed", "OOM", 0, 200)])
    assert store.last_commit(run_id).round == 2
    assert [r for r, _ in store.records(run_id)] == [1, 2]
    assert store.records(run_id, after=1) == [(2, {"round": 2, "loss": 0.5})]
    assert [(p.client, p.round) for p in store.participations(run_id)] == \
        [("c1", 1), ("c2", 1), ("c3", 1), ("c4", 1), ("c5", 1), ("c1", 2)]
    assert store.participations(run_id, 3) == []


def test_empty_aux_and_no_participants(store):
    run_id = store.create_run("r", "", 1)
    store.commit_round(run_id, 1, tensors(1), {}, {}, {"skipped": "0 valid results"}, [])
    got = store.last_commit(run_id)
    assert got.aux == {} and got.record == {"skipped": "0 valid results"} and store.participations(run_id) == []


def test_wrong_round_numbers_are_refused_and_change_nothing(store):
    run_id = store.create_run("r", "", 5)
    with pytest.raises(StoreError, match="next round to commit is 1"):
        commit(store, run_id, 2)
    commit(store, run_id, 1)
    before = (store.get_run(run_id).round, store.records(run_id), store.participations(run_id))
    for rnd in (1, 3, 0, -1):
        with pytest.raises(StoreError):
            commit(store, run_id, rnd)
    assert (store.get_run(run_id).round, store.records(run_id), store.participations(run_id)) == before
    assert bitwise_equal(store.last_commit(run_id).tensors, tensors(1))


def test_invalid_commits_are_refused(store):
    run_id = store.create_run("r", "", 5)
    cases = [
        ({"record": {"t": torch.zeros(1)}}, "record is not JSON-serialisable"),
        ({"strategy_state": ["not", "a", "dict"]}, "strategy_state must be a dict"),
        ({"participations": [Participation("c1", "maybe")]}, "participation status 'maybe'"),
        ({"participations": [Participation("c1", "accepted", "", -1, 0)]}, "bytes_up must be"),
    ]
    for override, message in cases:
        args = dict(tensors=tensors(1), aux={}, strategy_state={}, record={}, participations=[]) | override
        with pytest.raises(StoreError, match=message):
            store.commit_round(run_id, 1, **args)
    with pytest.raises(StoreError, match="unknown run"):
        commit(store, "run-nope", 1)
    assert store.last_commit(run_id) is None


def test_blobs_written_without_a_transaction_commit_nothing(store, db_url, tmp_path):
    """A crash between writing the blobs and the transaction leaves the previous round in charge."""
    run_id = store.create_run("r", "", 5)
    commit(store, run_id, 1)
    orphan = store.blobs.put(codec.encode(tensors(2)))  # what commit_round writes first ... then death
    assert store.blobs.path(orphan).exists()
    for s in (store, Store(db_url, tmp_path / "blobs")):
        assert s.last_commit(run_id).round == 1 and s.get_run(run_id).round == 1
        assert [r for r, _ in s.records(run_id)] == [1]
    commit(store, run_id, 2)  # the resumed coordinator commits round 2 over the orphan, same content
    assert bitwise_equal(store.last_commit(run_id).tensors, tensors(2))


def test_corrupted_or_missing_blob_is_detected(store):
    run_id = store.create_run("r", "", 5)
    commit(store, run_id, 1)
    path = store.model_path(run_id)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in a tensor value
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupted"):
        store.last_commit(run_id)
    path.unlink()
    with pytest.raises(StoreError, match="missing"):
        store.last_commit(run_id)


def test_reopen_sees_everything(db_url, tmp_path):
    with Store(db_url, tmp_path / "blobs") as s:
        s.add_client("alice", "tok")
        s.revoke_client("alice")
        s.add_client("bob", "tok-b")
        run_id = s.create_run("r", "a = 1\n", 4)
        s.set_status(run_id, "running")
        commit(s, run_id, 1)
        commit(s, run_id, 2)
    with Store(db_url, tmp_path / "blobs") as s:
        assert s.schema_version() == SCHEMA_VERSION
        assert [(c.name, c.revoked_at is not None) for c in s.list_clients()] == [("alice", True), ("bob", False)]
        s.check_client("bob", "tok-b")
        run = s.get_run(run_id)
        assert (run.status, run.round, run.config_toml) == ("running", 2, "a = 1\n")
        got = s.last_commit(run_id)
        assert got.round == 2 and bitwise_equal(got.tensors, tensors(2)) and got.strategy_state == {"seed": 2}
        assert len(s.participations(run_id)) == 2
        commit(s, run_id, 3)  # and resumes where it left off


def test_threads_share_one_store(store):
    """Committers on separate runs, racers on one run, and readers, all on the same Store object."""
    own = [store.create_run(f"own{i}", "", 8) for i in range(2)]
    shared = store.create_run("shared", "", 4)
    wins: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def committer(run_id):
        for rnd in range(1, 9):
            commit(store, run_id, rnd)

    def racer(me):
        for rnd in range(1, 5):
            while store.get_run(shared).round < rnd - 1:
                time.sleep(0.001)
            try:
                commit(store, shared, rnd, [Participation(f"t{me}", "accepted")])
                wins.append((rnd, me))
            except StoreError as e:
                assert "cannot commit round" in str(e) or "already committed" in str(e)

    def reader():
        while not stop.is_set():
            for run_id in own + [shared]:
                got = store.last_commit(run_id)
                if got is not None:
                    assert bitwise_equal(got.tensors, tensors(got.round))

    def guard(fn, *args):
        try:
            fn(*args)
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)

    workers = [threading.Thread(target=guard, args=(committer, r)) for r in own]
    workers += [threading.Thread(target=guard, args=(racer, i)) for i in range(3)]
    readers = [threading.Thread(target=guard, args=(reader,)) for _ in range(2)]
    for t in workers + readers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    stop.set()
    for t in readers:
        t.join(timeout=60)
    assert not errors, errors
    assert [store.get_run(r).round for r in own] == [8, 8]
    assert sorted(r for r, _ in wins) == [1, 2, 3, 4]  # each round won by exactly one racer
    assert [len(store.participations(shared, r)) for r in range(1, 5)] == [1, 1, 1, 1]


def test_future_schema_version_is_refused(db_url, tmp_path):
    Store(db_url, tmp_path / "blobs").close()
    engine = create_engine(normalize_url(db_url))
    with engine.begin() as conn:
        conn.execute(text("UPDATE schema_version SET version = 99"))
    engine.dispose()
    with pytest.raises(StoreError, match=f"schema version 99, newer than this fedadapt supports \\({SCHEMA_VERSION}\\)"):
        Store(db_url, tmp_path / "blobs")


def test_sqlite_pragmas(tmp_path):
    with Store(tmp_path / "f.db", tmp_path / "blobs") as s, s._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_sqlite_in_memory_works_across_threads(tmp_path):
    with Store("sqlite://", tmp_path / "blobs") as s:
        run_id = s.create_run("r", "", 2)
        t = threading.Thread(target=commit, args=(s, run_id, 1))
        t.start()
        t.join()
        assert s.last_commit(run_id).round == 1


# ---------------------------------------------------------------------------------------- kill -9

CHILD = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from fedadapt.server.store import Participation, Store
    s = Store(sys.argv[1], Path(sys.argv[2]))
    run_id, rnd = sys.argv[3], s.get_run(sys.argv[3]).round
    while True:
        rnd += 1
        t = {"w": torch.full((256,), float(rnd), dtype=torch.float64)}
        s.commit_round(run_id, rnd, t, {"m": torch.full((3,), float(-rnd))}, {"n": rnd}, {"round": rnd},
                       [Participation(f"c{i}", "accepted", "", rnd, i) for i in range(3)])
        print(rnd, flush=True)
""")


def test_sqlite_survives_kill_9(tmp_path):
    """SIGKILL at arbitrary points of a commit loop: reopening shows a prefix of whole rounds."""
    db, blobs = tmp_path / "fedadapt.db", tmp_path / "blobs"
    with Store(db, blobs) as s:
        run_id = s.create_run("crash", "", 10**6)
    reported = 0
    for delay in (0.0, 0.013, 0.031):  # kill at different phases; each child resumes after the last
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(db), str(blobs), run_id],
                                 stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
        try:
            start = reported
            while reported < start + 15:  # let it commit a few rounds, then kill it mid-stream
                line = child.stdout.readline()
                assert line, "the committing child exited early"
                reported = int(line)
            time.sleep(delay)
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
        with Store(db, blobs) as s:
            last = s.get_run(run_id).round
            assert last >= reported  # every round the child reported as committed survived
            assert [r for r, _ in s.records(run_id)] == list(range(1, last + 1))
            for rnd, rec in s.records(run_id):
                assert rec == {"round": rnd}
                assert [p.bytes_up for p in s.participations(run_id, rnd)] == [rnd] * 3
            got = s.last_commit(run_id)
            assert got.round == last and torch.equal(got.tensors["w"], torch.full((256,), float(last),
                                                                                   dtype=torch.float64))
            assert got.strategy_state == {"n": last}
            with s._engine.connect() as conn:  # every committed round's blobs are whole on disk
                digests = conn.exec_driver_sql("SELECT state_blob, aux_blob FROM rounds").all()
            assert len(digests) == last
            for state_blob, aux_blob in digests:
                codec.decode(s.blobs.get(state_blob))
                codec.decode(s.blobs.get(aux_blob))
            reported = last
