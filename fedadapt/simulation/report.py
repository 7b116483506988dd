"""`fedadapt report DIR`: the curves of a run (training loss, held-out accuracy, or perplexity for the causal-lm
task) as a PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fedadapt.core.errors import FedadaptError


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FedadaptError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines):  # a run stopped while writing its last round: the rounds before it stand
                print(f"fedadapt: {path}: its last line is cut off; plotting the {len(rows)} rounds before it",
                      file=sys.stderr)
                break
            raise FedadaptError(f"{path}: line {i} is not JSON ({exc.msg})") from None
    if not rows:
        raise FedadaptError(f"{path} has no rounds yet")
    return rows


def plot_run(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    pts = [(r["round"], r["loss"]) for r in rows if r.get("loss") is not None]
    ax_loss.plot(*zip(*pts), marker=".") if pts else None
    ax_loss.set(xlabel="round", ylabel="mean client training loss", title="training loss")
    chat = any(r.get("perplexity") is not None for r in rows)
    metric, reference, label = ("perplexity", "base_perplexity_subset", "base model") if chat else \
        ("accuracy", "majority_baseline", "majority class")
    pts = [(r["round"], r[metric]) for r in rows if r.get(metric) is not None]
    ax_acc.plot(*zip(*pts), marker=".", label="global model") if pts else None
    summary = run_dir / "summary.json"
    if summary.is_file():
        base = json.loads(summary.read_text()).get(reference)
        if base is not None:
            ax_acc.axhline(base, color="grey", linestyle="--", label=label)
    ax_acc.set(xlabel="round", ylabel=f"{metric} (held-out subset)", title=metric)
    ax_acc.legend()
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
