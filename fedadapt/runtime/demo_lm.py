"""`[model] source = "shakespeare-lm"`: the offline demo's base model, pretrained here once and cached.

No pretrained causal LM can be installed offline, so the chat demo first trains a small Llama-style model
centrally on conversations that no client holds (the comedies' and histories' cue -> reply pairs,
data/shakespeare_chat.py), with a BPE tokenizer trained on the same text, then fine-tunes it federatedly
on the tragedies' roles. The result is an ordinary Hugging Face folder under the fedadapt cache
(`$FEDADAPT_CACHE/models/shakespeare-lm-v1/`), built atomically, the same on every run of this machine;
users with their own model point `[model] source` at its folder instead.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from fedadapt.core.config import TrainConfig
from fedadapt.core.files import fsync_dir
from fedadapt.data.base import default_cache_dir
from fedadapt.data.shakespeare_chat import pretraining_conversations
from fedadapt.models.adapters import attach_full
from fedadapt.models.causal_lm import PLAIN_TEMPLATE, ChatTokenizer, load_causal_lm
from fedadapt.models.tiny import save_tiny_causal_lm
from fedadapt.training.loop import train_local

NAME = "shakespeare-lm"
VERSION = 1  # bump when the recipe below changes, so a stale cache is rebuilt instead of reused
SIZES = {"hidden": 128, "layers": 4, "heads": 4, "intermediate": 384, "max_positions": 256}
VOCAB, MAX_LENGTH, SEED = 2048, 96, 20261207
TRAIN = TrainConfig(optimizer="adamw", lr=2e-3, local_steps=1200, batch_size=32, max_grad_norm=1.0)


def demo_lm_dir(cache_dir: str | Path | None = None) -> Path:
    """The folder of the demo base model, pretrained on first use (a few minutes on two CPU cores)."""
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "models"
    final = root / f"{NAME}-v{VERSION}"
    if (final / "model.safetensors").is_file():
        return final
    staging = root / f".{NAME}-v{VERSION}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    start = time.perf_counter()
    print(f"building the demo base model {NAME} once (pretraining on held-out plays; cached in {final})",
          file=sys.stderr, flush=True)
    chats = pretraining_conversations()
    # the texts, and the plain template's headers, so that they are single tokens
    texts = [m["content"] for c in chats for m in c] + ["### User:\n", "### Assistant:\n"] * 1000
    save_tiny_causal_lm(staging, "llama", texts, seed=SEED, vocab_size=VOCAB, **SIZES)
    model, tokenizer = load_causal_lm(str(staging), device="cpu")
    attach_full(model)
    data = ChatTokenizer(tokenizer, MAX_LENGTH)(chats)
    metrics = train_local(model, data, TRAIN, SEED)
    model.encoder.save_pretrained(staging)
    tokenizer.chat_template = PLAIN_TEMPLATE  # shipped with the model, so every tool renders chats alike
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, final)  # atomic: a concurrent build's result is as good as ours
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(root)
    print(f"{NAME}: {sum(p.numel() for p in model.parameters()):,} parameters, final training loss "
          f"{metrics['loss']:.3f}, built in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    return final
