"""Memory of one federated round of a ~1B-parameter causal LM on the CPU: 10 simulated clients share one base.

    .venv/bin/python benchmarks/memory_llm.py [--clients 10] [--keep DIR]

The model is Llama-3.2-1B-shaped (hidden 2048, 16 layers, 32 heads, 8 key/value heads, intermediate 8192) with
random weights from a config and the chat demo's tokenizer (vocabulary 2,048, so the embeddings are small and
the ~1B parameters are the transformer's), saved as a Hugging Face folder once. One round of the chat demo's
scenario then runs with LoRA (rank 8 on q/v) on 10 roles, one local step each (batch 2, 64 tokens), fp32 on
the CPU. Peak RSS and PSS are sampled over the whole process tree (measure.py): the base is loaded once and
every virtual client swaps only its adapter, so the peak is the base plus one client's activations.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import REPO, RESULTS, machine_facts, simulate_cmd, write_json
from measure import measure

SHAPE = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
         "intermediate_size": 8192, "max_position_embeddings": 256, "tie_word_embeddings": True}


def build(folder: Path) -> int:
    """The model folder (random weights, seeded) with the demo tokenizer; returns the parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedadapt.runtime.demo_lm import demo_lm_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_lm_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--keep", type=Path, help="build the model folder here (kept; reused if present)")
    ap.add_argument("--json", type=Path, default=RESULTS / "memory_llm.json")
    args = ap.parse_args(argv)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="llm1b-"))
    try:
        if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
            print(f"building the 1B model folder in {folder}", flush=True)
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                            f"import memory_llm, pathlib; print(memory_llm.build(pathlib.Path({str(folder)!r})))"],
                           check=True)
        params = json.loads((folder / "config.json").read_text())
        weights = sum(f.stat().st_size for f in folder.glob("model*.safetensors"))  # fp32: 4 bytes a parameter
        with tempfile.TemporaryDirectory() as out:
            overrides = [f'model.source="{folder}"', 'model.device="cpu"', "model.max_length=64", "rounds=1",
                         f"clients_per_round={args.clients}", f"data.num_clients={args.clients}",
                         "train.local_steps=1", "train.batch_size=2", "eval.max_examples=8", "eval.every=1",
                         "eval.final_max_examples=8", "eval.generate=0", "eval.batch_size=2"]
            cmd = simulate_cmd(REPO / "simulations" / "chat-tiny.toml", out, overrides) + ["--threads", "2"]
            m = measure(cmd, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            summary = json.loads((Path(out) / "summary.json").read_text()) if m["rc"] == 0 else {}
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    result = {"machine": machine_facts(), "command": " ".join(cmd), "shape": SHAPE, "vocab": params["vocab_size"],
              "parameters_approx": weights // 4,
              "clients": args.clients, "measure": m, "summary": summary}
    write_json(args.json, result)
    print(f"| model | clients | peak RSS (GB) | peak PSS (GB) | wall (s) |\n|---|---|---|---|---|\n"
          f"| Llama 2048x16, {weights / 4e9:.2f}B parameters | {args.clients} | {m['peak_rss_mb'] / 1024:.2f} | "
          f"{(m['peak_pss_mb'] or 0) / 1024:.2f} | {m['wall_s']:.0f} |")
    return 0 if m["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
