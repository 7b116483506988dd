"""The offline chat demo's data: Shakespeare's dialogue as cue -> reply conversations.

Every speech that answers another one is a conversation: the user turn is the last `lines` lines of the
speech before it (the cue), the assistant turn the first `lines` lines of the reply. A client is one speaking
role ("PLAY/ROLE") of the tragedies with at least `min_speeches` replies, so each client learns to answer in
its own voice: the natural non-IID split. The comedies and histories are held out from every client: the
demo's base model is pretrained on their conversations (runtime/demo_lm.py).
"""

from __future__ import annotations

from pathlib import Path

from fedadapt.core.errors import DataError
from fedadapt.data._split import check_fraction
from fedadapt.data.base import TaskData
from fedadapt.data.chat import chat_task
from fedadapt.data.shakespeare import FOLIO_GENRE, load_dialogues

CLIENT_GENRE = "tragedy"


def conversations(genres: set[str], lines: int, cache_dir: str | Path | None = None):
    """(group "PLAY/ROLE", conversation) for every reply in the plays of `genres`, in play and speaking order."""
    out = []
    for stem, speeches in sorted(load_dialogues(cache_dir).items()):
        if FOLIO_GENRE[stem] not in genres:
            continue
        for (_, cue), (role, reply) in zip(speeches, speeches[1:]):
            out.append((f"{stem.upper()}/{role}", [{"role": "user", "content": "\n".join(cue[-lines:])},
                                                   {"role": "assistant", "content": "\n".join(reply[:lines])}]))
    return out


def load_shakespeare_chat(*, lines: int = 2, min_speeches: int = 60, test_fraction: float = 0.2, seed: int = 0,
                          cache_dir: str | Path | None = None) -> TaskData:
    """The clients' conversations (tragedy roles with at least `min_speeches` replies), a seeded `test_fraction`
    of every role's held out."""
    if isinstance(lines, bool) or not isinstance(lines, int) or lines < 1:
        raise DataError(f"lines must be a positive integer, got {lines!r}.")
    test_fraction = check_fraction("test_fraction", test_fraction)
    rows = conversations({CLIENT_GENRE}, lines, cache_dir)
    counts: dict[str, int] = {}
    for group, _ in rows:
        counts[group] = counts.get(group, 0) + 1
    rows = [(g, c) for g, c in rows if counts[g] >= min_speeches]
    if not rows:
        raise DataError(f"No {CLIENT_GENRE} role has {min_speeches} replies; lower data.min_lines.")
    return chat_task("shakespeare-chat", [(c, g) for g, c in rows], test_fraction, seed)


def pretraining_conversations(lines: int = 2, cache_dir: str | Path | None = None) -> list[list[dict[str, str]]]:
    """The held-out plays' conversations (every genre but the clients'): the demo base model's training data."""
    return [c for _, c in conversations(set(FOLIO_GENRE.values()) - {CLIENT_GENRE}, lines, cache_dir)]
