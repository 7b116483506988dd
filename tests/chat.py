"""Tiny causal-LM runs for tests: config-built models of several architectures saved as Hugging Face folders
with a trained tokenizer, chat JSONL with one client per `client` value, and a scenario TOML."""

from __future__ import annotations

import json
import random
from pathlib import Path

from fedadapt.models.tiny import save_tiny_causal_lm

WORDS = "the king queen lord sword crown love night day death blood heart fair sweet gentle noble".split()


def chat_rows(clients: int = 4, per_client: int = 24, seed: int = 0) -> list[dict]:
    """Prompt/response pairs with a learnable rule (the response sorts the prompt's words, each client adds its
    own closing word): loss on responses goes down quickly even for a tiny random model."""
    rng = random.Random(seed)
    rows = []
    for c in range(clients):
        for _ in range(per_client):
            prompt = " ".join(rng.choice(WORDS) for _ in range(4))
            rows.append({"prompt": prompt, "response": " ".join(sorted(prompt.split())) + f" {WORDS[c]}",
                         "client": f"c{c}"})
    return rows


def chat_file(path: Path, **kwargs) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(**kwargs)))
    return path


def tiny_lm(folder: Path, arch: str) -> Path:
    """A 2-layer `arch` model with a 300-token BPE tokenizer (Qwen2 with a ChatML template, the others plain)."""
    rows = chat_rows()
    return save_tiny_causal_lm(folder, arch, [r["prompt"] + " " + r["response"] for r in rows], vocab_size=300,
                               chatml=arch == "qwen2")


def chat_toml(model: Path, data: Path, *, strategy: str = 'name = "fedavg"', rounds: int = 2, extra: str = "",
              clients_per_round: int = 4, generate: int = 4) -> str:
    return f"""
name = "chat-test"
seed = 3
rounds = {rounds}
clients_per_round = {clients_per_round}
[model]
source = "{model}"
task = "causal-lm"
max_length = 40
device = "cpu"
[adapter]
kind = "lora"
rank = 4
alpha = 8.0
[data]
dataset = "{data}"
[train]
optimizer = "adamw"
lr = 0.02
local_steps = 4
batch_size = 8
[eval]
max_examples = 32
generate = {generate}
max_new_tokens = 8
[strategy]
{strategy}
{extra}
"""
