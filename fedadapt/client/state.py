"""A client daemon's own privacy state, kept on disk next to its credentials (or in --state-dir):

    secagg.key           its X25519 private key (raw 32 bytes, 0600): the public half goes to the
                         coordinator at Join, so a restarted daemon still matches the keys of a round in flight
    privacy-ledger.json  its client-DP ledger per run ({"runs": {run_id: Ledger.to_dict()}}): the epsilon it
                         has spent survives a restart, so a restart never refreshes its budget

A daemon started with a cap (`client start --max-epsilon E`) trains only under client DP and never lets
the epsilons of all its runs add up to more than E (basic composition across runs: their epsilons add, and
so do their deltas), whatever budget a run's config gives it.

Every write goes to a temporary file that is fsynced and then renamed over the old one, so a daemon
killed at any moment leaves the previous version or the new one, never half of a file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from fedadapt.core.errors import ConfigError
from fedadapt.core.files import write_atomic
from fedadapt.privacy import secagg
from fedadapt.privacy.ledger import Ledger

KEY_FILE = "secagg.key"
LEDGER_FILE = "privacy-ledger.json"


class ClientState:
    def __init__(self, root: Path, max_epsilon: float | None = None):
        self.root = Path(root)
        self.max_epsilon = max_epsilon  # this client's own total budget over every run; None: the runs' own

    def secagg_key(self):
        """This client's X25519 key, made on first use. Raises OSError if the folder is not writable."""
        path = self.root / KEY_FILE
        if path.is_file():
            raw = path.read_bytes()
            if len(raw) != 32:
                raise ConfigError(f"{path} is not a 32-byte X25519 key; delete it to make a new one")
            return secagg.new_key(raw)
        key = secagg.new_key()
        write_atomic(path, key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
        return key

    def ledger_file(self, run_id: str) -> LedgerFile:
        return LedgerFile(self.root / LEDGER_FILE, run_id)


class LedgerFile:
    """One run's entry in the ledger file: what PrivateRecipe loads before and saves after each local run."""

    def __init__(self, path: Path, run_id: str):
        self.path, self.run_id = path, run_id

    def load(self) -> Ledger | None:
        entry = self._all().get(self.run_id)
        return None if entry is None else Ledger.from_dict(entry)

    def spent_elsewhere(self) -> float:
        """Epsilon spent in every other run (each at its own delta): what a cap across runs adds up."""
        return math.fsum(Ledger.from_dict(e).spent for run, e in self._all().items() if run != self.run_id)

    def save(self, ledger: Ledger) -> None:
        runs = self._all()
        runs[self.run_id] = ledger.to_dict()
        write_atomic(self.path, json.dumps({"runs": runs}, indent=1).encode())

    def _all(self) -> dict:
        try:
            return dict(json.loads(self.path.read_text())["runs"])
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as exc:  # never start over silently: that resets budgets
            raise ConfigError(f"privacy ledger {self.path} is unreadable ({exc}); restore it or remove it "
                              "knowing that every run's spent epsilon is forgotten") from None
