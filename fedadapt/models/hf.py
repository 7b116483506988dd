"""Loading from a local Hugging Face folder, offline and quietly (shared by the classifier and causal-LM tasks)."""

from __future__ import annotations

import os
from pathlib import Path

from fedadapt.core.errors import ModelError


def local_dir(source: str, missing: str) -> Path:
    """`source` as a Hugging Face model folder; `missing`: the one-line error when it is not a folder."""
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ModelError(missing)
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {str(path)!r} has no config.json (not a Hugging Face model directory)")
    return path


def offline_and_quiet() -> None:
    """A local folder must never reach for a hub, and transformers' progress bars and notices are not ours."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
