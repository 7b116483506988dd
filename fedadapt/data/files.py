"""User data from a JSONL or CSV file: one example per line/row."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fedadapt.core.errors import DataError
from fedadapt.data._split import split_task
from fedadapt.data.base import Dataset, TaskData

_INT_LABEL = re.compile(r"-?\d+")
_SUFFIXES = (".jsonl", ".csv")


def load_file(
    path: str | Path,
    *,
    text_field: str = "text",
    label_field: str = "label",
    group_field: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> TaskData:
    """A text classification task from a `.jsonl` or `.csv` file.

    Labels may be strings or integers; `label_names` are the distinct labels
    sorted (numerically when every label is an integer), and a label's id is its
    position there. `group_field`, if given, becomes `Dataset.groups` (for the
    "natural" partition). The test split is stratified by label and seeded.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"Data file {path} does not exist.")
    if not path.is_file():
        raise DataError(f"Data file {path} is not a file.")
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise DataError(f"Data file {path} has extension {path.suffix!r}; fedadapt reads only .jsonl and .csv files.")
    fields = [text_field, label_field] + ([group_field] if group_field else [])
    rows = read_jsonl(path) if suffix == ".jsonl" else _read_csv(path, fields)

    texts: list[str] = []
    raw_labels: list[str] = []
    groups: list[str] = []
    try:
        for where, record in rows:
            missing = [f for f in fields if f not in record]
            if missing:
                present = ", ".join(repr(k) for k in record) or "none"
                raise DataError(f"{where}: no field {missing[0]!r} (fields present: {present}).")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}.")
            texts.append(text)
            raw_labels.append(_scalar(record[label_field], label_field, where))
            if group_field:
                groups.append(_scalar(record[group_field], group_field, where))
    except UnicodeDecodeError as e:
        raise DataError(f"Data file {path} is not UTF-8 text ({e.reason}); save it as UTF-8.") from None
    except csv.Error as e:
        raise DataError(f"Data file {path} is not valid CSV ({e}).") from None
    if not texts:
        raise DataError(f"Data file {path} holds no examples.")

    names = sorted(set(raw_labels))
    if all(_INT_LABEL.fullmatch(n) for n in names):
        # "10" must sort after "9", and 7 and "7" are the same label.
        names = [str(v) for v in sorted({int(n) for n in names})]
        raw_labels = [str(int(v)) for v in raw_labels]
    label_id = {n: i for i, n in enumerate(names)}
    data = Dataset(
        texts,
        torch.tensor([label_id[v] for v in raw_labels], dtype=torch.int64),
        names,
        groups if group_field else None,
    )
    return split_task(path.stem, data, test_fraction, seed)


def _scalar(value: Any, field: str, where: str) -> str:
    """Labels and groups are strings or integers (bools and floats are likely mistakes)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: field {field!r} must be a string or an integer, got {json.dumps(value)}.")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: field {field!r} is empty.")
    return str(value)


def read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for every non-blank line of a JSONL file; a line that is not a JSON object is a one-line
    DataError naming the file and line."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing one) are not examples
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not valid JSON ({e.msg}).") from None
            if not isinstance(record, dict):
                raise DataError(f"{where} is not a JSON object (one example per line is expected).")
            yield where, record


def _read_csv(path: Path, fields: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    # utf-8-sig: spreadsheets often write a byte-order mark that would glue onto the first column name.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return  # empty file: the caller reports "no examples"
        missing = [name for name in fields if name not in reader.fieldnames]
        if missing:
            present = ", ".join(repr(k) for k in reader.fieldnames)
            raise DataError(f"{path} has no column {missing[0]!r} (columns present: {present}).")
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            # A short row fills missing columns with None; treat those as absent.
            yield where, {k: v for k, v in row.items() if k is not None and v is not None}
