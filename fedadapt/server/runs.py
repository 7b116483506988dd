"""Runs on a coordinator: a queue of submitted runs, executed one at a time, each round committed.

A run's truth is the store: `rounds` holds every committed round (global tensors, strategy state,
metrics, per-client traffic). Executing a run always starts from its last commit, so a coordinator
killed at any point and started again on the same database resumes at the first uncommitted round,
and a stopped run resumes the same way. Rounds in flight when a run is stopped are discarded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from fedadapt.core import codec
from fedadapt.core.config import RunConfig, load_config_text
from fedadapt.core.errors import FedadaptError
from fedadapt.proto import fedadapt_pb2 as pb
from fedadapt.runtime import setup
from fedadapt.runtime.engine import RoundEngine, RoundRecord
from fedadapt.server.hub import ClientHub
from fedadapt.server.store import LedgerEntry, Participation, RunRow, Store, StoreError
from fedadapt.server.telemetry import RefusalLog, Stats
from fedadapt.strategies import private
from fedadapt.strategies.base import GlobalState

log = logging.getLogger("fedadapt.server")
TERMINAL = ("stopped", "finished", "failed")


class RunStopped(Exception):
    pass


class RunManager:
    def __init__(self, store: Store, hub: ClientHub, max_payload_bytes: int = codec.DEFAULT_MAX_BYTES,
                 refusals: RefusalLog | None = None, stats: Stats | None = None):
        self.store = store
        self.hub = hub
        self.max_payload_bytes = max_payload_bytes
        self.stats = stats or (refusals.stats if refusals is not None else Stats())
        self.refusals = refusals or RefusalLog(None, self.stats)
        self._cond = threading.Condition()
        self._active: str | None = None
        self._stop_active = False
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="runs", daemon=True)

    # ------------------------------------------------------------------ Control API
    def submit(self, config_toml: str) -> pb.RunInfo:
        cfg = load_config_text(config_toml, source="submitted config")
        setup.check(cfg, "coordinator")  # strategy options and [privacy] now, not when the run starts
        run_id = self.store.create_run(cfg.name, config_toml, cfg.rounds)
        log.info("run %s (%s) queued", run_id, cfg.name)
        self._notify()
        return self.get(run_id)

    def list(self) -> list[pb.RunInfo]:
        return [self._info(r) for r in self.store.list_runs()]

    def get(self, run_id: str) -> pb.RunInfo:
        return self._info(self._row(run_id))

    def download(self, run_id: str) -> tuple[int, str, Path]:
        """A run's last committed round, its config (as submitted) and the path of that round's global model."""
        row = self._row(run_id)
        last = self.store.last_model(run_id)
        if last is None:
            raise FedadaptError(f"run {run_id} has no committed round yet: there is no model to download")
        return last[0], row.config_toml, last[1]

    def stop(self, run_id: str) -> pb.RunInfo:
        row = self._row(run_id)
        if row.status in TERMINAL:
            raise FedadaptError(f"run {run_id} is already {row.status}")
        with self._cond:
            self.store.set_status(run_id, "stopped")
            if self._active == run_id:
                self._stop_active = True
                self.hub.abort()
            self._cond.notify_all()
        return self.get(run_id)

    def resume(self, run_id: str) -> pb.RunInfo:
        row = self._row(run_id)
        if row.status not in ("stopped", "failed"):
            raise FedadaptError(f"run {run_id} is {row.status}; only stopped or failed runs can be resumed")
        self.store.set_status(run_id, "queued")
        self._notify()
        return self.get(run_id)

    def follow(self, run_id: str, is_active: Callable[[], bool]) -> Iterator[pb.RunEvent]:
        state = self.follow_start(run_id)  # unknown ids fail now, not inside the stream

        def events() -> Iterator[pb.RunEvent]:
            while is_active():
                events, done = self.follow_poll(state)
                yield from events
                if done:
                    return
                with self._cond:
                    self._cond.wait(timeout=1.0)

        return events()

    def follow_start(self, run_id: str) -> dict:
        """What `follow_poll` needs; raises KeyError for an unknown run."""
        self._row(run_id)
        return {"run_id": run_id, "seen": 0, "status": None, "waiting": ""}

    def follow_poll(self, state: dict) -> tuple[list[pb.RunEvent], bool]:
        """The events since the last poll of `state` (committed rounds, a status change, what the run waits
        for), and whether the run is over."""
        run_id, out = state["run_id"], []
        for rnd, record in self.store.records(run_id, after=state["seen"]):
            state["seen"] = rnd
            out.append(pb.RunEvent(run_id=run_id, kind="round", round=rnd, record_json=json.dumps(record)))
        row = self.store.get_run(run_id)
        if row.status != state["status"]:
            state["status"] = row.status
            out.append(pb.RunEvent(run_id=run_id, kind="status", round=row.round, status=row.status,
                                   record_json=json.dumps({"error": row.error})))
        waiting = self._waiting(row)
        if waiting != state["waiting"]:
            state["waiting"] = waiting
            out.append(pb.RunEvent(run_id=run_id, kind="waiting", round=row.round, status=waiting))
        return out, row.status in TERMINAL and row.round == state["seen"]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        interrupted = next(iter(self.store.runs_with_status("running")), None)  # the coordinator restarted
        if interrupted is not None:  # its clients' re-uploads are held from the first moment, not refused
            self.hub.expect_run(interrupted.run_id, interrupted.round + 1)
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self.hub.abort()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closing:
                    return
                # a run left "running" was interrupted by a crash: it goes first
                row = next(iter(self.store.runs_with_status("running") or self.store.runs_with_status("queued")), None)
                if row is None:
                    self._cond.wait(timeout=5.0)
                    continue
                self._active, self._stop_active = row.run_id, False
            try:
                self._execute(row)
            finally:
                with self._cond:
                    self._active = None
                    self._cond.notify_all()

    def _execute(self, row: RunRow) -> None:
        run_id = row.run_id
        self.store.set_status(run_id, "running")
        # clients retrying an upload for the round in flight when the coordinator stopped are held from now,
        # not refused as "not the active run" while the run's model is being built
        self.hub.expect_run(run_id, row.round + 1)
        self._notify()
        try:
            cfg = load_config_text(row.config_toml, source=f"run {run_id}")
            setup.check(cfg, "coordinator")  # a run queued before a check existed fails rather than runs
            self._rounds(run_id, cfg)
        except RunStopped:
            if self._closing and not self._stop_active:
                committed = self.store.get_run(run_id).round
                log.info("coordinator shutting down: run %s stays running after committed round %d and resumes "
                         "from there when the coordinator starts again", run_id, committed)
            else:
                log.info("run %s stopped", run_id)
            return
        except FedadaptError as exc:
            log.error("run %s failed: %s", run_id, exc)
            self.store.set_status(run_id, "failed", str(exc))
            return
        except Exception as exc:  # a bug: keep the coordinator up, fail only this run, keep the trace in the log
            log.exception("run %s failed", run_id)
            self.store.set_status(run_id, "failed", f"internal error: {exc!r}")
            return
        finally:
            self.hub.end_run()
            self._notify()
        with self._cond:
            if self._stop_active:
                return
            self.store.set_status(run_id, "finished")
        log.info("run %s finished", run_id)

    def _rounds(self, run_id: str, cfg: RunConfig) -> None:
        # N for strategies that divide by all clients (FedAU): the clients registered when the run starts;
        # a resumed run keeps the N it started with (strategies persist it in their state). The run id names
        # the run in secure-aggregation masks and in each client daemon's privacy ledger (client/state.py).
        registered = sum(c.revoked_at is None for c in self.store.list_clients())
        run = setup.load(cfg, partitions=False, num_clients=registered, salt=run_id)  # the label set, input
        # width and model the clients build too; the server evaluates on the held-out set
        strategy, c = run.strategy, cfg.coordinator
        engine = RoundEngine(strategy, self.hub, run.spec, min_results=c.min_results,
                             round_timeout=c.round_timeout or None, max_payload_bytes=self.max_payload_bytes,
                             evaluate=lambda s: run.evaluate(run.eval_subset, s), eval_every=cfg.eval.every)
        commit = self.store.last_commit(run_id)
        if commit is not None:
            engine.state = GlobalState(commit.tensors, commit.aux, commit.round)
            strategy.load_state_dict(commit.strategy_state)
            log.info("run %s resumes after committed round %d", run_id, commit.round)
        self.hub.begin_run(run_id, json.dumps({**run.spec_for_clients(), "run_id": run_id}),
                           next_round=engine.state.round + 1, quorum=c.min_results, validator=engine.check_answer)
        need = c.min_clients or c.min_results
        for rnd in range(engine.state.round + 1, cfg.rounds + 1):
            if not self.hub.wait_for_clients(need, c.join_timeout or None):
                self._check_stop()
                raise FedadaptError(f"fewer than {need} clients connected within {c.join_timeout:g}s "
                                    "(coordinator.min_clients, coordinator.join_timeout)")
            self._check_stop()
            record = engine.run_round(rnd, last=rnd == cfg.rounds)
            self._check_stop()  # a stop during the round discards it: it was never committed
            self._commit(run_id, engine, strategy, record, cfg.privacy.delta)

    def _commit(self, run_id: str, engine: RoundEngine, strategy, record: RoundRecord, delta: float) -> None:
        parts = [Participation(cid, info["status"], info["reason"], info["up"], info["down"])
                 for cid, info in record.per_client.items()]
        extra = []
        for ev in self.hub.drain_events(run_id):  # late answers, clients that left
            extra.append(dataclasses.asdict(ev))
            if ev.status in ("late", "rejected") or ev.client not in record.per_client:
                reason = ev.reason if ev.round == record.round else f"round {ev.round}: {ev.reason}"
                parts.append(Participation(ev.client, ev.status, reason, ev.bytes_up, 0))
        data = dataclasses.asdict(record)
        data["events"] = extra
        data["refused"] = self.refusals.take(run_id)  # uploads refused since the previous commit, by code
        s = engine.state
        ledger = [LedgerEntry(cid, float(eps), delta) for cid, eps in private.epsilon_metrics(record.strategy).items()]
        self.store.commit_round(run_id, record.round, s.tensors, s.aux, strategy.state_dict(), data, parts, ledger)
        self.stats.inc("rounds_committed")
        acc = "" if record.accuracy is None else f" accuracy {record.accuracy:.3f}"
        log.info("run %s round %d committed: %d results%s%s", run_id, record.round, len(record.clients), acc,
                 f" (skipped: {record.skipped})" if record.skipped else "")
        self._notify()

    def _check_stop(self) -> None:
        with self._cond:
            if self._stop_active or self._closing:
                raise RunStopped()

    # ------------------------------------------------------------------ helpers
    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _row(self, run_id: str) -> RunRow:
        try:
            return self.store.get_run(run_id)
        except StoreError:
            raise KeyError(f"no run {run_id!r} on this coordinator") from None

    def _info(self, r: RunRow) -> pb.RunInfo:
        path = self.store.model_path(r.run_id)
        refused = sum(self.store.refusal_counts(r.run_id).values())
        return pb.RunInfo(run_id=r.run_id, name=r.name, status=r.status, rounds=r.rounds, round=r.round,
                          created=_iso(r.created_at), updated=_iso(r.updated_at), error=r.error or "",
                          model_path=str(path) if path else "", waiting=self._waiting(r), refused=refused)

    def _waiting(self, r: RunRow) -> str:
        """What a run waits for now: clients, answers, or its turn."""
        if r.status == "running" and self._active == r.run_id:
            return self.hub.waiting()
        if r.status == "queued":
            active = self._active
            return f"queued behind run {active}" if active else "queued"
        return ""


def _iso(t) -> str:
    return t.isoformat(timespec="seconds") if t is not None else ""

