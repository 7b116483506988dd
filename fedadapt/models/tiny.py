"""Small causal LMs built from a config, with a BPE tokenizer trained on the spot, saved as ordinary Hugging
Face folders: what tests run every architecture on, and what the offline demo pretrains (no pretrained
causal LM can be downloaded here; users point `[model] source` at their own Llama/Qwen/Mistral folder).

The tokenizer is byte-level BPE (`tokenizers`): no unknown token, exact round trips of any text. With
`chatml=True` it carries a ChatML chat template and its <|im_start|>/<|im_end|> tokens (Qwen-style); without,
it has no template and fedadapt renders conversations with its plain template.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedadapt.core.errors import ModelError

ARCHITECTURES = ("llama", "gpt2", "qwen2", "mistral")
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
          "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def train_tokenizer(texts: list[str], vocab_size: int = 512, chatml: bool = False):
    """A byte-level BPE tokenizer trained on `texts` (a transformers fast tokenizer, pad/bos/eos set)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS] + (["<|im_start|>", "<|im_end|>"] if chatml else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    if chatml:
        fast.chat_template = CHATML
        fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return fast


def tiny_config(arch: str, tokenizer, *, hidden: int = 32, layers: int = 2, heads: int = 4,
                intermediate: int | None = None, max_positions: int = 256):
    """A transformers config of `arch` sized as asked, with the tokenizer's vocabulary and special ids."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    vocab, inner = len(tokenizer), intermediate or 2 * hidden
    if arch == "gpt2":  # Conv1D layers (weights stored in x out): LoRA with fan_in_fan_out
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=inner,
                          n_positions=max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    kinds = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if arch not in kinds:
        raise ModelError(f"tiny architecture must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    return kinds[arch](vocab_size=vocab, hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                       max_position_embeddings=max_positions, tie_word_embeddings=True, **ids)


def save_tiny_causal_lm(folder: str | Path, arch: str, texts: list[str], *, seed: int = 0, vocab_size: int = 512,
                        chatml: bool = False, **sizes) -> Path:
    """Train a tokenizer on `texts`, build `arch` with random (seeded) weights, save both to `folder`."""
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer(texts, vocab_size, chatml)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer, **sizes))
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
