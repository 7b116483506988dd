"""Content-addressed blob files: the tensor checkpoints a round commit refers to by sha256.

A blob is written completely (temp file, fsync, atomic rename) before any database row can name it,
so a crash between the two leaves at worst an unreferenced file, never a row pointing at half a file.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from fedadapt.core.errors import FedadaptError
from fedadapt.core.files import fsync_dir, write_atomic

_DIGEST = re.compile(r"[0-9a-f]{64}")


class StoreError(FedadaptError):
    """The coordinator's state store was misused, or its files are missing or damaged."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        # Only exact lowercase sha256 hex reaches the filesystem: no traversal, no aliases.
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise StoreError(f"invalid blob digest {digest!r}: expected 64 lowercase hex characters")
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        digest = sha256_hex(data)
        target = self.path(digest)
        if target.exists():  # same name, same content: nothing to do
            return digest
        new_dir = not target.parent.exists()
        write_atomic(target, data)  # durable, rename included, before a row refers to it
        if new_dir:
            fsync_dir(self.root)
        return digest

    def get(self, digest: str) -> bytes:
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is missing from {self.root}") from None
        except OSError as exc:
            raise StoreError(f"blob {digest} cannot be read: {exc.strerror or exc}") from None
        if sha256_hex(data) != digest:
            raise StoreError(f"blob {digest} is corrupted: its content no longer matches its sha256 ({path})")
        return data

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()
