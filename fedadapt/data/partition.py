"""Split a training set among federated clients with flwr-datasets' partitioners."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import os
import random
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

from fedadapt.core.errors import DataError
from fedadapt.data.base import Dataset, default_cache_dir

SCHEMES = ("iid", "dirichlet", "natural")


def partition(train: Dataset, *, cache_dir: str | Path | None = None, **args: Any) -> dict[str, list[int]]:
    """`compute_partition(train, **args)`, remembered on disk (`<cache>/partitions/`).

    A partition is a pure function of the labels, groups and arguments, and importing
    flwr-datasets (it brings `datasets` and pyarrow) costs seconds and ~200 MB: a
    repeated simulation reads the stored result instead. The key includes the
    flwr-datasets version, so an upgrade recomputes.
    """
    bound = inspect.signature(compute_partition).bind(train, **args)  # a bad argument fails here, as it would there
    bound.apply_defaults()
    scheme, num_clients, alpha, seed, min_examples = (bound.arguments[k] for k in (
        "scheme", "num_clients", "alpha", "seed", "min_examples"))
    key = hashlib.sha256(json.dumps([
        scheme, num_clients, alpha, seed, min_examples, version("flwr-datasets"),
        hashlib.sha256(train.labels.numpy().tobytes()).hexdigest(),
        hashlib.sha256("\x1f".join(train.groups or []).encode()).hexdigest(),
    ]).encode()).hexdigest()[:32]
    path = Path(cache_dir or default_cache_dir()) / "partitions" / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass  # absent, truncated or foreign: compute it (again)
    clients = compute_partition(train, **args)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(clients))
        os.replace(tmp, path)  # atomic: a concurrent run never reads half a file
    except OSError:
        pass  # the cache only saves time; an unwritable one must not fail the run
    return clients


def compute_partition(
    train: Dataset,
    *,
    scheme: str,
    num_clients: int | None = None,
    alpha: float = 0.5,
    seed: int = 0,
    min_examples: int = 1,
) -> dict[str, list[int]]:
    """{client id: sorted indices into `train`}, the same for the same arguments.

    - "iid": seeded shuffle, then `IidPartitioner` (equal sizes, +-1); ids client-000, ...
    - "dirichlet": `DirichletPartitioner` over the labels with concentration `alpha`
      (small alpha: each client sees few labels), redrawn by flwr-datasets (up to
      10 times) until every client has `min_examples`.
    - "natural": `NaturalIdPartitioner` over `train.groups`, one client per group,
      named by the group; `num_clients` keeps that many groups in a seeded random
      order (a fair sample, not the biggest groups).
    """
    if scheme not in SCHEMES:
        raise DataError(f"Unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}.")
    if isinstance(min_examples, bool) or not isinstance(min_examples, int) or min_examples < 1:
        raise DataError(f"min_examples must be a positive integer, got {min_examples!r}.")
    if len(train) == 0:
        raise DataError(f"The training set is empty: there is nothing to partition ({scheme}).")
    if scheme == "natural":
        clients = _natural(train, num_clients, seed)
    else:
        if num_clients is None or isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise DataError(f"The {scheme} partition needs num_clients, a positive integer; got {num_clients!r}.")
        if num_clients > len(train):
            raise DataError(
                f"Client {_client_id(len(train))} would get zero examples: the {scheme} partition of "
                f"{len(train)} examples among {num_clients} clients; use at most {len(train)} clients."
            )
        if scheme == "iid":
            clients = _iid(train, num_clients, seed)
        else:
            clients = _dirichlet(train, num_clients, alpha, seed, min_examples)
    for client, indices in clients.items():
        if len(indices) < min_examples:
            raise DataError(
                f"Client {client} would get {len(indices)} examples (fewer than min_examples={min_examples}) "
                f"in the {scheme} partition; use fewer clients"
                + (" or a larger alpha." if scheme == "dirichlet" else ".")
            )
    return clients


def _client_id(i: int) -> str:
    return f"client-{i:03d}"


def _table(columns: dict[str, list[Any]]) -> Any:
    # Only the index and the column a partitioner reads: features stay out (they
    # may be large tensors), so building the table is cheap.
    from datasets import Dataset as HFDataset  # heavy; an edge client never partitions

    return HFDataset.from_dict(columns)


def _read_back(partitioner: Any, ids: list[str]) -> dict[str, list[int]]:
    return {client: sorted(partitioner.load_partition(i)["idx"]) for i, client in enumerate(ids)}


def _iid(train: Dataset, num_clients: int, seed: int) -> dict[str, list[int]]:
    from flwr_datasets.partitioner import IidPartitioner

    partitioner = IidPartitioner(num_partitions=num_clients)
    # IidPartitioner takes contiguous shards and does not shuffle: without this,
    # data stored in order (by label, by speaker) would be anything but iid.
    partitioner.dataset = _table({"idx": list(range(len(train)))}).shuffle(seed=seed)
    return _read_back(partitioner, [_client_id(i) for i in range(num_clients)])


def _dirichlet(train: Dataset, num_clients: int, alpha: float, seed: int, min_examples: int) -> dict[str, list[int]]:
    from flwr_datasets.partitioner import DirichletPartitioner

    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise DataError(f"alpha for the dirichlet partition must be a positive number, got {alpha!r}.")
    table = _table({"idx": list(range(len(train))), "label": train.labels.tolist()})

    def make(min_size: int) -> Any:
        # self_balancing: a client already above the average size gets no more of
        # the remaining labels, so sizes stay comparable (no client with half the
        # data) while the label mix stays skewed.
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_size,
            self_balancing=True,
            seed=seed,
        )
        partitioner.dataset = table
        return partitioner

    ids = [_client_id(i) for i in range(num_clients)]
    try:
        with warnings.catch_warnings():
            # It warns on every redraw; the outcome is reported below instead.
            warnings.simplefilter("ignore")
            return _read_back(make(min_examples), ids)
    except ValueError:
        # All redraws left some client short. Replay the first draw without the
        # minimum to name a client that falls short.
        sizes = {client: len(idx) for client, idx in _read_back(make(0), ids).items()}
        client = min(sizes, key=lambda c: sizes[c])
        raise DataError(
            f"Client {client} would get {sizes[client]} examples (fewer than min_examples={min_examples}) in "
            f"the dirichlet partition with alpha={alpha} over {num_clients} clients, even after 10 redraws; "
            f"use a larger alpha, fewer clients or a smaller min_examples."
        ) from None


def _natural(train: Dataset, num_clients: int | None, seed: int) -> dict[str, list[int]]:
    if train.groups is None:
        raise DataError("The natural partition needs a natural id per example (groups), but this dataset has none.")
    names = sorted(set(train.groups))
    if num_clients is not None:
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or not 1 <= num_clients <= len(names):
            raise DataError(
                f"num_clients for the natural partition must be between 1 and the {len(names)} groups, "
                f"got {num_clients!r}."
            )
        rng = random.Random(seed)
        rng.shuffle(names)
        names = sorted(names[:num_clients])
    kept = set(names)
    rows = [i for i, g in enumerate(train.groups) if g in kept]

    from flwr_datasets.partitioner import NaturalIdPartitioner

    partitioner = NaturalIdPartitioner(partition_by="group")
    partitioner.dataset = _table({"idx": rows, "group": [train.groups[i] for i in rows]})
    # NaturalIdPartitioner draws a tqdm progress bar on stderr; it is noise in a CLI run.
    with contextlib.redirect_stderr(io.StringIO()):
        ids = [partitioner.partition_id_to_natural_id[i] for i in range(partitioner.num_partitions)]
        return _read_back(partitioner, ids)
