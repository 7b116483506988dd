"""The coordinator's view of its client registry: every call is authenticated against an in-memory copy of
the store's `clients` table, refreshed every `refresh_s` seconds by a background thread, so a check costs a
dict lookup and a sha256, never a database query (a flood of wrong credentials cannot load the database or
hold the gRPC event loop). A name it does not know triggers at most one extra refresh per second, so a
client registered a moment ago is let in at once.

A client revoked (or re-issued a new token) with `fedadapt clients revoke` / `clients add` while the
coordinator runs is noticed at the next refresh: its open session is closed (`on_revoked`), which ends its
task stream and stops the round from waiting for it. The same thread writes `clients.last_seen` for the
clients that called since the previous write, every `touch_s` seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

from fedadapt.core.errors import AuthError

log = logging.getLogger("fedadapt.server")


class Registry:
    def __init__(self, store, *, refresh_s: float = 2.0, touch_s: float = 10.0,
                 on_revoked: Callable[[str, str], None] | None = None):
        self.store = store
        self.refresh_s, self.touch_s = refresh_s, touch_s
        self.on_revoked = on_revoked
        self._lock = threading.Lock()
        self._clients: dict[str, tuple[str, bool]] = store.registry()
        self._loaded = time.monotonic()
        self._seen: dict[str, datetime] = {}
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="registry", daemon=True)
        self._thread.start()

    def __call__(self, name: str, token: str) -> None:
        """Raise AuthError unless `name` is registered, not revoked, and `token` is its token."""
        entry = self._clients.get(name)
        if entry is None and time.monotonic() - self._loaded > 1.0:
            self.refresh()  # registered a moment ago? at most one query a second for unknown names
            entry = self._clients.get(name)
        if entry is None:
            raise AuthError(f"client {name[:80]!r} is not registered on this coordinator")
        token_hash, revoked = entry
        if revoked:
            raise AuthError(f"client {name!r} is revoked")
        presented = hashlib.sha256(token.encode("utf-8", "replace")).hexdigest() if token else ""
        if not hmac.compare_digest(token_hash, presented):
            raise AuthError(f"wrong credential for client {name!r}")
        self.seen(name)

    def seen(self, name: str) -> None:
        """`name` called now (written to clients.last_seen within `touch_s`)."""
        with self._lock:
            self._seen[name] = datetime.now(timezone.utc)

    def refresh(self) -> None:
        try:
            fresh = self.store.registry()
        except Exception as exc:  # the database is away: keep the last copy, say so
            log.error("could not refresh the client registry: %s", exc)
            self._loaded = time.monotonic()
            return
        old, self._clients, self._loaded = self._clients, fresh, time.monotonic()
        if self.on_revoked is None:
            return
        for name, (token_hash, revoked) in old.items():
            now = fresh.get(name)
            if revoked:
                continue
            if now is None or now[1]:
                self.on_revoked(name, "revoked")
            elif now[0] != token_hash:
                self.on_revoked(name, "its token was replaced")

    def flush(self) -> None:
        with self._lock:
            seen, self._seen = self._seen, {}
        if seen:
            try:
                self.store.touch_clients(seen)
            except Exception as exc:
                log.error("could not record when clients were last seen: %s", exc)

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=10)
        self.flush()

    def _loop(self) -> None:
        touched = time.monotonic()
        while not self._closing.wait(self.refresh_s):
            self.refresh()
            if time.monotonic() - touched >= self.touch_s:
                self.flush()
                touched = time.monotonic()
