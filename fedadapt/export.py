"""`fedadapt export RUN_DIR --format peft|merged --out DIR`: a run's global model as files any tool loads.

- `peft`: a standard peft LoRA adapter folder (adapter_config.json with base_model_name_or_path, and
  adapter_model.safetensors), written by peft itself, plus the tokenizer: `PeftModel.from_pretrained(
  AutoModelForCausalLM.from_pretrained(base), DIR)` loads it.
- `merged`: the base model with the adapter folded into its weights, and its tokenizer:
  `AutoModelForCausalLM.from_pretrained(DIR)`.

Each strategy says what its global tensors are as LoRA factors, dense base changes and other trained
tensors (`StrategyBase.export`). A base change (FLoRA's merged stacks) goes into the merged weights as it is;
in a peft adapter it becomes LoRA factors of the module's numerical rank (an SVD in fp64: exact to fp32
rounding). Merging is done in fp32 on the CPU, never into a quantized base. For a classifier the exported
model is the encoder (AutoModel), and the task head is written beside it as head.safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedadapt.core.config import RunConfig, load_config
from fedadapt.core.errors import ConfigError, ModelError
from fedadapt.data.tasks import input_dim, load_task
from fedadapt.models.build import build_model
from fedadapt.models.loading import minilm_path
from fedadapt.models.lora_layers import lora_layers
from fedadapt.models.lorasb import out_in
from fedadapt.runtime import setup
from fedadapt.strategies.base import Exported, ModelSpec
from fedadapt.strategies.registry import build

FORMATS = ("peft", "merged")
PEFT_PREFIX = "encoder.base_model.model."  # fedadapt's name of a module inside the peft-wrapped transformer


def export(run_dir: Path, fmt: str, out: Path, model_source: str | None = None) -> Path:
    """Write the run's global model to `out` in `fmt` (on the base at `model_source`, default the run's own);
    returns `out`."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    cfg, tensors = _read_run(run_dir)
    if model_source:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, source=model_source))
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; give another --out")
    # fp32 on the CPU, unquantized: merging into a 4-bit or bf16 base would round the adapter away
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device="cpu", dtype="fp32", quantize="none"))
    task = load_task(cfg) if cfg.model.task == "classification" else None
    loaded = build_model(setup.model_config(cfg), task.train.num_classes if task else 0, input_dim(task) if task else 0)
    model = loaded.model
    strategy, _ = build(cfg.strategy, setup.settings(cfg, num_clients=1))  # N does not change what is exported
    strategy.init_state(ModelSpec({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    exported = strategy.export(tensors, model)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    if fmt == "merged":
        _merged(cfg, exported, staging)
    else:
        _peft(model, exported, cfg, staging)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(staging)
    elif Path(_base_path(cfg)).is_dir():  # a classifier on a Hugging Face folder: its tokenizer goes along
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(_base_path(cfg), local_files_only=True).save_pretrained(staging)
    if exported.params and cfg.model.task == "classification":
        head = {k.removeprefix("head."): v.contiguous() for k, v in exported.params.items() if k.startswith("head.")}
        save_file(head, str(staging / "head.safetensors"))
        (staging / "head.json").write_text(json.dumps(_head_note(cfg, task), indent=2) + "\n")
    staging.rename(out)
    return out


def _read_run(run_dir: Path) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file() or not (run_dir / "model.safetensors").is_file():
        raise ConfigError(f"{run_dir} is not a finished run directory (it needs config.toml and model.safetensors; "
                          "for a coordinator's run: fedadapt run download RUN_ID --out DIR)")
    return load_config(run_dir / "config.toml"), load_file(str(run_dir / "model.safetensors"))


def _merged(cfg: RunConfig, exported: Exported, out: Path) -> None:
    """Every change folded into a fresh copy of the base: W + delta + scaling * B A (in fp64, then one rounding
    to the weight's dtype); a full fine-tuning's parameters copied in."""
    base = _fresh_base(cfg)
    with torch.no_grad():
        for module in set(exported.factors) | set(exported.base_delta):
            w = out_in(base.get_submodule(module.removeprefix(PEFT_PREFIX)))
            change = exported.base_delta.get(module, torch.zeros(w.shape)).double()
            if module in exported.factors:
                a, b, scaling = exported.factors[module]
                change = change + scaling * (b.double() @ a.double())
            w.copy_((w.double() + change).to(w.dtype))
        named = dict(base.named_parameters())
        for name, t in exported.params.items():
            if name.startswith("encoder."):  # full fine-tuning: every transformer parameter
                named[name.removeprefix("encoder.")].copy_(t)
    base.save_pretrained(out)


def _peft(model, exported: Exported, cfg: RunConfig, out: Path) -> None:
    """A fresh peft adapter on the plain base, its factors set to the exported ones (base changes as factors of
    their numerical rank), saved by peft."""
    if exported.full:
        raise ConfigError("this run trained every parameter (adapter.kind = 'full'): it has no adapter to export; "
                          "use --format merged")
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    factors = {m: _as_factors(exported, m) for m in sorted(set(exported.factors) | set(exported.base_delta))}
    if not factors:
        raise ModelError("the run's global state holds no adapter factors to export")
    hf = {m.removeprefix(PEFT_PREFIX): f for m, f in factors.items()}
    ranks = {m: a.shape[0] for m, (a, _, _) in hf.items()}
    first = next(iter(hf))
    config = LoraConfig(r=ranks[first], lora_alpha=hf[first][2] * ranks[first],
                        target_modules=sorted({m.rsplit(".", 1)[-1] for m in hf}),
                        rank_pattern={m: r for m, r in ranks.items()},
                        alpha_pattern={m: s * ranks[m] for m, (_, _, s) in hf.items()},
                        fan_in_fan_out=_transposed(model), lora_dropout=0.0,
                        task_type="CAUSAL_LM" if cfg.model.task == "causal-lm" else None)
    peft_model = get_peft_model(_fresh_base(cfg), config)
    state = {}
    for m, (a, b, _) in hf.items():
        state[f"base_model.model.{m}.lora_A.weight"] = a.float().contiguous()
        state[f"base_model.model.{m}.lora_B.weight"] = b.float().contiguous()
    result = set_peft_model_state_dict(peft_model, state)
    if result.unexpected_keys:
        raise ModelError(f"the exported factors do not fit the base model: {result.unexpected_keys[:3]}")
    peft_model.peft_config["default"].base_model_name_or_path = _base_path(cfg)
    peft_model.save_pretrained(out)


def _as_factors(exported: Exported, module: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The module's factors, with a base change appended as factors of its numerical rank: [B | U S] [A ; V^T]
    (scalings folded into B where two parts meet)."""
    delta = exported.base_delta.get(module)
    if delta is None:
        return exported.factors[module]
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = max(1, int((s > s[0] * torch.finfo(torch.float64).eps * max(delta.shape)).sum())) if s[0] > 0 else 1
    b, a = u[:, :k] * s[:k], vh[:k]
    if module in exported.factors:
        fa, fb, scaling = exported.factors[module]
        a, b = torch.cat([fa.double(), a]), torch.cat([scaling * fb.double(), b], dim=1)
    return a.to(delta.dtype), b.to(delta.dtype), 1.0


def _fresh_base(cfg: RunConfig):
    """The unmodified base transformer of the run, fp32 on the CPU (what a user loads from its folder)."""
    if cfg.model.task == "causal-lm":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(setup.model_config(cfg).model.source, local_files_only=True)
    bare = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, kind="full"))
    task = load_task(bare)
    return build_model(bare, task.train.num_classes, input_dim(task)).model.encoder


def _base_path(cfg: RunConfig) -> str:
    """Where the base model is, as base_model_name_or_path: its folder (absolute), or the built-in's name."""
    source = setup.model_config(cfg).model.source
    if cfg.model.task == "classification" and source == "minilm":
        return str(minilm_path())
    return str(Path(source).resolve()) if Path(source).is_dir() else source


def _transposed(model) -> bool:
    return any(getattr(layer, "fan_in_fan_out", False) for layer in lora_layers(model, required=False).values())


def _head_note(cfg: RunConfig, task) -> dict:
    return {"model": cfg.model.source, "pooling": "mean over attention_mask", "labels": task.train.label_names,
            "head": "logits = pooled @ head.weight.T + head.bias"}
