"""Instruction and chat data for the causal-LM task: JSONL conversations, one client per file or per value
of a field.

Each line is either `{"prompt": ..., "response": ...}` (one user turn and the assistant's answer) or
`{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}` with at least one assistant
turn; every other key is ignored except the group field. `path` is one `.jsonl` file (clients by its
`group_field`, default "client", when present) or a directory of `.jsonl` files (one client per file,
named by the file's stem). The held-out split takes the same share of every client's conversations, so
the test set holds unseen conversations of the clients that train.

Rendering (chat template or the plain one), tokenization and the response-only labels are the model's
business (models/causal_lm.py): a conversation stays plain data here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedadapt.core.errors import DataError
from fedadapt.data._split import stratified_split
from fedadapt.data.base import Dataset, TaskData
from fedadapt.data.files import read_jsonl

ROLES = ("system", "user", "assistant")
Conversation = list[dict[str, str]]


def load_chats(path: str | Path, *, group_field: str = "client", test_fraction: float = 0.2,
               seed: int = 0) -> TaskData:
    """The conversations of `path` with their client groups, split into train and held-out test."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise DataError(f"Data folder {path} holds no .jsonl files (one file per client is expected).")
        rows = [(c, f.stem) for f in files for c, _ in _conversations(f, None)]
    elif path.is_file():
        if path.suffix.lower() != ".jsonl":
            raise DataError(f"Chat data {path} must be a .jsonl file or a folder of them, not {path.suffix!r}.")
        rows = list(_conversations(path, group_field))
    else:
        raise DataError(f"Chat data {path} does not exist.")
    if not rows:
        raise DataError(f"Chat data {path} holds no conversations.")
    return chat_task(path.stem, rows, test_fraction, seed)


def chat_task(name: str, rows: list[tuple[Conversation, str | None]], test_fraction: float, seed: int) -> TaskData:
    """A causal-LM task from (conversation, client group or None) rows: a seeded `test_fraction` of every
    client's conversations held out, so the test set holds unseen conversations of the clients that train."""
    grouped = all(g is not None for _, g in rows)
    index = {g: i for i, g in enumerate(sorted({g for _, g in rows if g is not None}))}
    data = Dataset([c for c, _ in rows], torch.zeros(len(rows), dtype=torch.int64), [],
                   [g for _, g in rows] if grouped else None)
    by_client = torch.tensor([index[g] for _, g in rows] if grouped else [0] * len(rows), dtype=torch.int64)
    train, test = stratified_split(by_client, test_fraction, seed)
    return TaskData(name, data.subset(train), data.subset(test), None, kind="causal-lm")


def _conversations(path: Path, group_field: str | None):
    """(conversation, group or None) for every line of a JSONL file, each checked with its line number."""
    try:
        for where, record in read_jsonl(path):
            group = record.get(group_field) if group_field else None
            if group is not None and (isinstance(group, bool) or not isinstance(group, (str, int))
                                      or not str(group).strip()):
                raise DataError(f"{where}: field {group_field!r} must be a non-empty string or an integer.")
            yield conversation(record, where), None if group is None else str(group)
    except UnicodeDecodeError as e:
        raise DataError(f"Chat data {path} is not UTF-8 text ({e.reason}); save it as UTF-8.") from None


def conversation(record: dict[str, Any], where: str) -> Conversation:
    """A record's messages: `messages` as given (checked), or a prompt/response pair as a user and an assistant
    turn."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects.")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {i} must be {{'role': one of {', '.join(ROLES)}, 'content': a "
                                f"string}}, got {json.dumps(m)[:80]}.")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the conversation has no 'assistant' message to learn from.")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    missing = [k for k in ("prompt", "response") if not isinstance(record.get(k), str)]
    if missing:
        present = ", ".join(repr(k) for k in record) or "none"
        raise DataError(f"{where}: expected 'messages', or 'prompt' and 'response' strings; no string "
                        f"{missing[0]!r} (fields present: {present}).")
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
