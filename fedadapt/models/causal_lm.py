"""The causal-LM task: any local Hugging Face causal LM with its tokenizer, conversations turned into token ids
with labels on the assistant's tokens only, and the loss and metrics of that objective.

Rendering follows the tokenizer's chat template, or PLAIN_TEMPLATE when it has none. Each assistant turn is
located by rendering the conversation up to it twice (the prompt with the generation header, then with the
turn) and the pieces are tokenized separately and concatenated: exactly what the model sees when it
generates, with no search for marker tokens. Padding is masked by length, never by token id (a pad that is
the EOS must still be learned at the end of a turn). A conversation longer than `max_length` keeps its last
assistant turn: the prompt is cut from the left (keeping its tail with the assistant header), the response
from the right only when it cannot fit; one left with no response token is dropped and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedadapt.core.errors import DataError, ModelError

from .classifier import Examples
from .device import quantization, resolve_device, resolve_dtype
from .hf import local_dir, offline_and_quiet

IGNORE = -100  # labels of tokens that are not learned (prompt, padding)
# For tokenizers without a chat template (saved into the run's tokenizer on export). The generation block
# marks the assistant's tokens for tools that use it; fedadapt masks by rendering (above).
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### User:\n{{ m['content'] }}\n\n"
    "{% else %}### Assistant:\n{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}\n\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


class CausalLM(nn.Module):
    """A causal LM as fedadapt trains it: `encoder` is the Hugging Face model (peft-wrapped once LoRA is
    attached; the name is the one every task uses for the transformer), the forward pass returns logits."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.encoder = lm
        self.head = nn.ModuleList()  # no task head: the LM head belongs to the frozen base

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@dataclass
class ChatFeatures(Examples):
    """Tokenized conversations, right-padded: `inputs` (input_ids, attention_mask) and `labels` (IGNORE except
    on assistant tokens), all [N, T]; plus, for generation, each conversation's last prompt (token ids) and
    the reference answer."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    prompts: list[list[int]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    truncated: int = 0  # conversations cut to max_length
    dropped: int = 0  # conversations left with no assistant token (not in the data)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> ChatFeatures:
        idx = torch.as_tensor(idx, dtype=torch.long)
        pos = idx.tolist()
        return ChatFeatures({k: v[idx] for k, v in self.inputs.items()}, self.labels[idx],
                            [self.prompts[i] for i in pos], [self.answers[i] for i in pos])

    def batch(self, idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs = {k: v[idx] for k, v in self.inputs.items()}
        width = max(int(inputs["attention_mask"].sum(dim=1).max()), 1)  # trim columns no example uses
        return {k: v[:, :width] for k, v in inputs.items()}, self.labels[idx][:, :width]

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Per conversation, the mean NLL of its assistant tokens (next-token, shifted); then the mean or sum
        over conversations. Per-sequence means keep one example's gradient independent of the others' lengths,
        which per-example clipping (client DP) needs."""
        per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                    ignore_index=IGNORE, reduction="none").view(labels.shape[0], -1)
        counts = (labels[:, 1:] != IGNORE).sum(dim=1).clamp(min=1)
        per_example = per_token.sum(dim=1) / counts
        return per_example.sum() if reduction == "sum" else per_example.mean()

    @staticmethod
    def eval_sums(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        targets = labels[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                              reduction="sum")
        hit = (logits[:, :-1].argmax(dim=-1) == targets) & (targets != IGNORE)
        return {"nll": float(nll), "tokens": float((targets != IGNORE).sum()), "correct": float(hit.sum())}

    @staticmethod
    def eval_metrics(sums: dict[str, float], examples: int) -> dict[str, float]:
        """Loss per assistant token over the whole set (not a mean of batch means), its perplexity, and the
        share of assistant tokens predicted exactly (greedy next token)."""
        tokens = max(sums.get("tokens", 0.0), 1.0)
        loss = sums.get("nll", 0.0) / tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": sums.get("correct", 0.0)
                / tokens, "tokens": sums.get("tokens", 0.0), "examples": float(examples)}


class ChatTokenizer:
    """Conversations -> ChatFeatures for one tokenizer and length budget."""

    def __init__(self, tokenizer, max_length: int):
        self.tok = tokenizer
        self.max_length = max_length
        self.template = getattr(tokenizer, "chat_template", None) or PLAIN_TEMPLATE
        if tokenizer.pad_token_id is None:  # pad = EOS, masked by length (never by id): EOS is still learned
            if tokenizer.eos_token_id is None:
                raise ModelError("the tokenizer has neither a pad nor an EOS token: give it a pad token "
                                 "(an unused special token) in its tokenizer_config.json")
            tokenizer.pad_token = tokenizer.eos_token

    def render(self, messages: list[dict[str, str]], prompt: bool) -> str:
        try:
            return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                add_generation_prompt=prompt)
        except Exception as exc:  # jinja errors of a model's own template: a one-line error, naming it
            raise DataError(f"the chat template cannot render this conversation: {exc}") from None

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]  # a template adds its own BOS, if any

    def segments(self, messages: list[dict[str, str]]) -> tuple[list[tuple[list[int], bool]], int]:
        """(token ids, learned?) pieces in order, up to the end of the last assistant turn; and the number of
        tokens of that turn's header (what the generation prompt adds), which truncation keeps."""
        out, done, header = [], "", 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix, upto = self.render(messages[:i], True), self.render(messages[: i + 1], False)
            header = len(self.ids(prefix[len(self.render(messages[:i], False)):]))
            if not prefix.startswith(done) or not upto.startswith(prefix):
                raise DataError("the chat template does not render a conversation as a prefix of its continuation "
                                "(it rewrites earlier turns), so the assistant's tokens cannot be located; give "
                                "the tokenizer a template that appends turns")
            out += [(self.ids(prefix[len(done):]), False), (self.ids(upto[len(prefix):]), True)]
            done = upto
        return out, header

    def __call__(self, conversations: list[list[dict[str, str]]]) -> ChatFeatures:
        rows, labels, prompts, answers, truncated, dropped = [], [], [], [], 0, 0
        for messages in conversations:
            ids, lab = [], []
            pieces, header = self.segments(messages)
            for piece, learned in pieces:
                ids += piece
                lab += piece if learned else [IGNORE] * len(piece)
            if len(ids) > self.max_length:
                ids, lab = self._fit(ids, lab, header)
                truncated += 1
            if not any(x != IGNORE for x in lab[1:]):
                dropped += 1  # nothing to learn: a batch of these would make the loss NaN
                continue
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            rows.append(ids)
            labels.append(lab)
            prompts.append(self.ids(self.render(messages[:last], True))[-self.max_length:])
            answers.append(messages[last]["content"])
        width = max((len(r) for r in rows), default=1)
        input_ids = torch.full((len(rows), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        target = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, labels)):
            input_ids[i, : len(r)], mask[i, : len(r)], target[i, : len(r)] = torch.tensor(r), 1, torch.tensor(lab)
        return ChatFeatures({"input_ids": input_ids, "attention_mask": mask}, target, prompts, answers,
                            truncated, dropped)

    def _fit(self, ids: list[int], lab: list[int], header: int) -> tuple[list[int], list[int]]:
        """`max_length` tokens ending at the last learned token: the prompt's tail before the last assistant turn
        (its header at least), and the response cut on the right if it cannot fit beside that header."""
        end = max(i for i, x in enumerate(lab) if x != IGNORE) + 1
        start = end
        while start > 0 and lab[start - 1] != IGNORE:
            start -= 1  # the first token of the last assistant turn
        keep = min(start, max(1, header), self.max_length - 1)
        begin = max(0, min(end - self.max_length, start - keep))
        return ids[begin: begin + self.max_length], lab[begin: begin + self.max_length]


def load_causal_lm(source: str, *, device: str = "auto", dtype: str = "fp32", quantize: str = "none"):
    """(CausalLM on its device, the tokenizer) from a local Hugging Face directory; never touches a hub."""
    path = local_dir(source, f"model {source!r} is not a directory (a causal LM is any local Hugging Face model "
                             "folder)")
    offline_and_quiet()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = resolve_device(device)
    precision = resolve_dtype(dtype, where)
    quant = quantization(quantize, where, precision)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read the model config in {str(path)!r}: {exc}") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ModelError(f"model {str(path)!r} (model_type {config.model_type!r}) is not a causal language model: "
                         "the causal-lm task needs one that AutoModelForCausalLM loads")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer of {str(path)!r}: {exc}") from None
    kwargs = {"dtype": precision}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": where.index or 0})
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot load a causal LM from {str(path)!r}: {exc}") from None
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
    else:
        lm.to(where)
    lm.requires_grad_(False)
    return CausalLM(lm), tokenizer


def lora_targets(lm: nn.Module, requested: list[str]) -> tuple[list[str] | str, bool]:
    """(target modules, fan_in_fan_out) for LoRA on `lm`: the requested names; else what peft uses for the
    model type; else q_proj and v_proj where both are Linear layers; else every linear layer but the output
    head (peft's "all-linear"). GPT-2-style Conv1D layers store weights transposed: fan_in_fan_out."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS
    from transformers.pytorch_utils import Conv1D

    names = {n.rsplit(".", 1)[-1]: m for n, m in lm.named_modules()}
    if requested:
        targets: list[str] | str = list(requested)
    elif lm.config.model_type in DEFAULTS:
        targets = list(DEFAULTS[lm.config.model_type])
    elif all(isinstance(names.get(n), nn.Linear) for n in ("q_proj", "v_proj")):
        targets = ["q_proj", "v_proj"]
    else:
        targets = "all-linear"
    chosen = [names.get(t) for t in targets] if isinstance(targets, list) else []
    return targets, any(isinstance(m, Conv1D) for m in chosen)
