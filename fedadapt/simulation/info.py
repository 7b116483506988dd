"""`fedadapt data info CONFIG`: what a scenario's data and partition look like, before running it."""

from __future__ import annotations

import statistics

import torch
from rich.console import Console
from rich.table import Table

from fedadapt.core.config import RunConfig
from fedadapt.data.tasks import client_partitions, load_task


def print_info(cfg: RunConfig) -> None:
    task = load_task(cfg)
    d = cfg.data
    parts = client_partitions(cfg, task)  # as the simulation will split it
    sizes = [len(v) for v in parts.values()]
    names = task.train.label_names
    table = Table(title=f"{task.name}: {len(parts)} clients ({d.partition})")
    table.add_column("split")
    table.add_column("examples", justify="right")
    for label in names:
        table.add_column(label, justify="right")
    for split, ds in (("train", task.train), ("test", task.test), ("test (unseen clients)", task.test_unseen)):
        if ds is None or len(ds) == 0:
            continue
        counts = torch.bincount(ds.labels, minlength=len(names)).tolist()
        table.add_row(split, str(len(ds)), *(f"{c / len(ds):.2f}" for c in counts))
    console = Console()
    console.print(table)
    labels_per_client = [len(set(task.train.labels[torch.as_tensor(v)].tolist())) for v in parts.values()]
    console.print(f"examples per client: min {min(sizes)}, median {statistics.median(sizes):g}, max {max(sizes)}; "
                  f"distinct labels per client: median {statistics.median(labels_per_client):g}")
