"""Greedy answers to held-out prompts, scored against the reference answers: ROUGE-L (rouge-score, Google's
implementation) and exact match, strict and normalised.

Prompts are left-padded for batched generation (right padding would put the new tokens after the pads) and
the generation config is given explicitly, so a model folder's own sampling defaults do not apply.
"""

from __future__ import annotations

import string
from typing import Any

import torch

from fedadapt.core.errors import ConfigError


def normalize(text: str) -> str:
    """Lowercase, without punctuation, articles and extra whitespace (SQuAD's normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """The greedy continuation of each prompt (token ids), decoded, without special tokens, stripped."""
    from transformers import GenerationConfig

    lm = model.encoder
    device = next(model.parameters()).device
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if end_of_turn is not None:  # ChatML turns end with <|im_end|>, not the EOS
        config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        new = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        out += [t.strip() for t in tokenizer.batch_decode(new[:, width:], skip_special_tokens=True)]
    return out


def score(answers: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-L F1 (target first, as rouge-score expects) and exact match, strict and normalised."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ConfigError("scoring generations needs rouge-score: pip install 'fedadapt[sim]'") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    n = max(len(answers), 1)
    rouge = sum(scorer.score(ref, ans)["rougeL"].fmeasure for ans, ref in zip(answers, references))
    strict = sum(bool(ans) and ans == ref.strip() for ans, ref in zip(answers, references))
    loose = sum(bool(ans) and normalize(ans) == normalize(ref) for ans, ref in zip(answers, references))
    return {"rouge_l": rouge / n, "exact_match": strict / n, "exact_match_normalized": loose / n,
            "generated": float(len(answers))}


def samples(tokenizer, prompts: list[list[int]], references: list[str], answers: list[str]) -> list[dict[str, Any]]:
    """What generations.jsonl holds: the prompt as rendered, the reference and the model's answer."""
    return [{"prompt": tokenizer.decode(p, skip_special_tokens=False), "reference": ref, "answer": ans}
            for p, ref, ans in zip(prompts, references, answers)]
