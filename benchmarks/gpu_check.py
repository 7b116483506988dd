"""On a CUDA machine: the causal-LM task on the GPU in bf16 and with a 4-bit (QLoRA) base, next to a plain peft
training loop on the same model, data and steps.

    .venv/bin/pip install 'fedadapt[gpu]'         # bitsandbytes, for the 4-bit base
    .venv/bin/python benchmarks/gpu_check.py [--model HF_DIR] [--steps 40] [--batch-size 8]

For each precision (bf16, then a 4-bit NF4 base with bf16 compute), two runs of `--steps` LoRA steps (rank 8,
the architecture's default targets, AdamW, one client holding every training conversation of the chat demo):
- fedadapt: one round of `fedadapt simulate simulations/chat-tiny.toml` in this process, on cuda;
- plain peft: AutoModelForCausalLM (+ prepare_model_for_kbit_training for 4-bit) and get_peft_model, the same
  tokenized batches, a bare AdamW loop.
Printed: tokens/s of training (assistant and prompt tokens processed), peak GPU memory
(torch.cuda.max_memory_allocated) and the final held-out loss. On a machine without CUDA it says so and exits 2.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import REPO, RESULTS, machine_facts, write_json

SCENARIO = REPO / "simulations" / "chat-tiny.toml"


def fedadapt_run(model: str, dtype: str, quantize: str, steps: int, batch: int) -> dict:
    from rich.console import Console

    from fedadapt.core.config import load_config
    from fedadapt.simulation.runner import simulate

    cfg = load_config(SCENARIO, [f'model.source="{model}"', 'model.device="cuda"', f'model.dtype="{dtype}"',
                                 f'model.quantize="{quantize}"', "rounds=1", "clients_per_round=1",
                                 'data.partition="iid"', "data.num_clients=1", f"train.local_steps={steps}",
                                 f"train.batch_size={batch}", "eval.generate=0",
                                 "eval.max_examples=8"])  # a round's seconds include its evaluation
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = simulate(cfg, Path(out), console=Console(quiet=True))
        rows = (Path(out) / "metrics.jsonl").read_text().splitlines()
    import json

    seconds = json.loads(rows[0])["seconds"]
    return {"seconds_round": seconds, "total_seconds": time.perf_counter() - start, "loss": summary["loss"],
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30}


def plain_run(model: str, dtype: str, quantize: str, steps: int, batch: int) -> dict:
    """A bare peft loop on the same conversations (tokenized by fedadapt's ChatTokenizer, the same labels)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from fedadapt.core.config import load_config
    from fedadapt.data.tasks import load_task
    from fedadapt.models.causal_lm import ChatFeatures, ChatTokenizer

    cfg = load_config(SCENARIO)
    task = load_task(cfg)
    tok = AutoTokenizer.from_pretrained(model)
    featurize = ChatTokenizer(tok, cfg.model.max_length)
    train, test = featurize(task.train.features), featurize(task.test.features).sample(cfg.eval.final_max_examples, 0)
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    kwargs = {"dtype": precision}
    if quantize == "4bit":
        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                             bnb_4bit_use_double_quant=True,
                                                             bnb_4bit_compute_dtype=torch.bfloat16),
                      device_map={"": 0})
    torch.cuda.reset_peak_memory_stats()
    lm = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    if quantize == "4bit":
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
    else:
        lm.cuda()
    lm = get_peft_model(lm, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=cfg.train.lr)
    g = torch.Generator().manual_seed(0)
    order = itertools.cycle(torch.randperm(len(train), generator=g).split(batch))
    lm.train()
    torch.cuda.synchronize()
    start, tokens = time.perf_counter(), 0
    for _ in range(steps):
        inputs, labels = train.batch(next(order))
        inputs = {k: v.cuda() for k, v in inputs.items()}
        loss = ChatFeatures.loss(lm(**inputs).logits, labels.cuda())
        opt.zero_grad()
        loss.backward()
        opt.step()
        tokens += int(inputs["attention_mask"].sum())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    lm.eval()
    sums = {}
    with torch.no_grad():
        for i in range(0, len(test), 32):
            inputs, labels = test.batch(torch.arange(i, min(i + 32, len(test))))
            inputs = {k: v.cuda() for k, v in inputs.items()}
            for k, v in ChatFeatures.eval_sums(lm(**inputs).logits, labels.cuda()).items():
                sums[k] = sums.get(k, 0.0) + v
    return {"seconds_train": seconds, "tokens_per_s": tokens / seconds, "tokens": tokens,
            "loss": ChatFeatures.eval_metrics(sums, len(test))["loss"], "peak_gpu_gb": torch.cuda.max_memory_allocated()
            / 2**30}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a Hugging Face causal LM folder (default: the chat demo's base)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", type=Path, default=RESULTS / "gpu_check.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False); run it on one",
              file=sys.stderr)
        return 2
    from fedadapt.runtime.demo_lm import demo_lm_dir

    model = args.model or str(demo_lm_dir())
    rows = {}
    for dtype, quantize in (("bf16", "none"), ("bf16", "4bit")):
        plain = plain_run(model, dtype, quantize, args.steps, args.batch_size)
        fed = fedadapt_run(model, dtype, quantize, args.steps, args.batch_size)
        fed["tokens_per_s"] = plain["tokens"] / fed["seconds_round"]  # the same batches' tokens, fedadapt's time
        rows[f"{dtype}/{quantize}"] = {"fedadapt": fed, "plain_peft": plain}
        write_json(args.json, {"machine": machine_facts(), "gpu": torch.cuda.get_device_name(0), "model": model,
                               "steps": args.steps, "batch_size": args.batch_size, "rows": rows})
    print(f"GPU: {torch.cuda.get_device_name(0)}; model {model}; {args.steps} steps of batch {args.batch_size}")
    print("| precision | run | tokens/s | peak GPU memory (GB) | held-out loss |\n|---|---|---|---|---|")
    for key, r in rows.items():
        for side, m in r.items():
            print(f"| {key} | {side} | {m['tokens_per_s']:.0f} | {m['peak_gpu_gb']:.2f} | {m['loss']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
