#!/usr/bin/env python3
"""Flower's own FlowerTune LLM example (Flower 1.42) against fedadapt, side by side on the same tiny LM and data
(issue #19, acceptance point 5): wall time per round, peak memory of the whole process tree, and the held-out
loss of the final adapter.

    .venv/bin/python benchmarks/flowertune_vs_fedadapt.py --repeats 3
    .venv/bin/python benchmarks/flowertune_vs_fedadapt.py --report      # the tables of the last run's JSON

Workload (both sides): the chat demo's base model (fedadapt's `shakespeare-lm`, a 1M-parameter Llama with a
2048-token BPE tokenizer, ~/.cache/fedadapt/models/shakespeare-lm-v1), its clients' conversations (the chat
demo's data, `data.min_lines=200`: the 6 tragedy roles with at least 200 replies, 1216 training conversations,
304 held out), 6 clients, all 6 every round, `--rounds` rounds (default 4), 10 local steps x batch 16, LoRA rank
8 / alpha 16 on q_proj and v_proj, AdamW at a constant learning rate of 0.01 (fedadapt's chat-tiny value), one
torch thread per client process.

* fedadapt: `fedadapt simulate simulations/chat-tiny.toml --threads 1 --set ...` (one process; clients run one
  after another in it). The final adapter is its run's model.safetensors, turned into a peft folder with
  `fedadapt export RUN --format peft`.
* Flower: examples/flowertune-llm of Flower's repository, copied at run time from a snapshot of it
  (`fetch github:adap/flower` gives /work/.mirror/adap+flower/repo; `--flower-repo`) into
  benchmarks/.work/flowertune/app, with the smallest changes that let it run offline on CPU (CHANGES below,
  printed as a diff and stored in the JSON), run with its own pinned stack (trl 0.8.1, peft 0.6.2,
  transformers 4.53.0, flwr[simulation] 1.42.0; torch 2.13.0+cpu instead of its torch 2.8.0 pin) in its own
  venv benchmarks/.work/venv-flowertune (made on first use), through `flwr run APP local --stream` on the local
  simulation runtime (the managed local SuperLink, SuperExec, flwr-simulation, Ray), 1 CPU per ClientApp
  (`client-resources-num-cpus=1`: two Ray actors on the two cores, each with OMP_NUM_THREADS=1). Everything
  else is set through its run config (`-c`), not its code. Its final adapter is the ServerApp's
  results/<time>/peft_<rounds> folder.

Per round: fedadapt's metrics.jsonl `seconds`; Flower's from the ServerApp's own log timestamps
(FLWR_LOG_LEVEL=DEBUG turns on Flower's timestamps): [ROUND k] to [ROUND k+1], the last to "Strategy execution
finished". Warm rounds are rounds 2..N (round 1 of Flower starts its Ray actors and imports torch/trl in them).
Memory: benchmarks/measure.py, RSS every 0.1 s and PSS every 0.5 s summed over every process of the command,
including the detached SuperLink and Ray's processes (found by a tag in their environment).

Held-out loss, the same way for both final adapters and the base: plain transformers 5.25 + peft 0.22 in the
project venv, `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER)`, fp32, NLL per
response token summed over the 304 held-out conversations of the 6 roles. Each conversation is scored in two
renderings, since each side trains on its own: `chat` (the tokenizer's chat template, fedadapt's plain
template: the response and its EOS are scored) and `alpaca` (FlowerTune's Alpaca prompt: the tokens after
"### Response:" are scored, as its DataCollatorForCompletionOnlyLM labels them).

Run it on a quiet machine if you can: each side waits (up to --idle-wait s) for the other processes to use
fewer than --idle-threshold cores, and the table reports how busy the machine was.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flower_env import OFFLINE  # noqa: E402
from harness import (  # noqa: E402
    BENCH_DIR,
    PROJECT_PYTHON,
    REPO,
    RESULTS,
    busy_cores,
    command_line,
    kill_processes,
    log,
    machine_facts,
    utc_now,
    wait_for_quiet,
    write_json,
)
from measure import matching_processes, measure  # noqa: E402

WORK = BENCH_DIR / ".work" / "flowertune"
VENV = BENCH_DIR / ".work" / "venv-flowertune"
VENV_READY = VENV / ".bench-ready"
RESULTS_JSON = RESULTS / "flowertune_vs_fedadapt.json"
DEFAULT_FLOWER_REPO = Path("/work/.mirror/adap+flower/repo")
EXAMPLE = "examples/flowertune-llm"
FEDADAPT_BIN = PROJECT_PYTHON.parent / "fedadapt"
SCENARIO = REPO / "simulations" / "chat-tiny.toml"
TAG_KEY = "FEDADAPT_BENCH_TAG"

# FlowerTune's own dependencies (examples/flowertune-llm/pyproject.toml), less what cannot run here: torch 2.8.0
# -> the local 2.13.0 CPU wheel (installed FIRST, or pip fetches CUDA wheels); bitsandbytes (CUDA only; not
# imported), fschat, hf_transfer, scipy, sentencepiece (not imported by the app's code); plus psutil.
TORCH_PIN = "torch==2.13.0"
FLOWERTUNE_PINS = ["flwr[simulation]==1.42.0", "flwr-datasets>=0.6.0", "trl==0.8.1", "peft==0.6.2",
                   "transformers==4.53.0", "omegaconf==2.3.0", "psutil", TORCH_PIN]

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.")  # flowertune_llm/dataset.py, formatting_prompts_func

# (file, old, new, why): the changes made to the example's code. Each `old` must occur exactly once.
CHANGES = [
    ("flowertune_llm/models.py",
     '''    else:
        raise ValueError(
            f"Use 4-bit or 8-bit quantization. You passed: {model_cfg.quantization}/"
        )
''',
     '''    elif model_cfg.quantization == 0:  # [bench] CPU: no bitsandbytes (CUDA only)
        quantization_config = None
    else:
        raise ValueError(
            f"Use 4-bit or 8-bit quantization. You passed: {model_cfg.quantization}/"
        )
''',
     "no 4-bit on CPU: model.quantization = 0 loads the base unquantized (bitsandbytes needs CUDA; the example "
     "only accepts 4 or 8)"),
    ("flowertune_llm/models.py",
     '''        torch_dtype=torch.bfloat16,
''',
     '''        torch_dtype=torch.bfloat16 if quantization_config else torch.float32,  # [bench]
''',
     "the unquantized base loads in fp32, as fedadapt's does (bf16 is the 4-bit compute dtype; loading the fp32 "
     "base in bf16 would round its weights, and prepare_model_for_kbit_training upcasts them to fp32 anyway)"),
    ("flowertune_llm/dataset.py",
     '''from flwr_datasets.partitioner import IidPartitioner
''',
     '''from flwr_datasets.partitioner import IidPartitioner, NaturalIdPartitioner
''',
     "(import for the next change)"),
    ("flowertune_llm/dataset.py",
     '''        partitioner = IidPartitioner(num_partitions=num_partitions)
        FDS = FederatedDataset(
            dataset=dataset_name,
            partitioners={"train": partitioner},
        )
''',
     '''        partitioner = IidPartitioner(num_partitions=num_partitions)
        FDS = FederatedDataset(
            dataset=dataset_name,
            partitioners={"train": partitioner},
        ) if not dataset_name.endswith(".jsonl") else FederatedDataset(  # [bench] a local JSONL file
            dataset="json", data_files=dataset_name,
            partitioners={"train": NaturalIdPartitioner(partition_by="client")},
        )
''',
     "a local JSONL file instead of a hub dataset: dataset.name = PATH.jsonl is read by Flower Datasets' "
     "FederatedDataset through `datasets`' json loader, one partition per value of its `client` field "
     "(NaturalIdPartitioner), so each SuperNode trains on one fedadapt client's conversations (the example "
     "splits a hub dataset IID)"),
]

# Set through the run config (`flwr run ... -c`), not the code: what the workload fixes (see the module doc)
# and what the CPU needs.
def flower_run_config(model_dir: Path, train_jsonl: Path, a: argparse.Namespace) -> dict[str, object]:
    return {
        "model.name": str(model_dir),                       # the local model folder instead of a hub id
        "dataset.name": str(train_jsonl),                   # the clients' JSONL instead of a hub dataset
        "model.quantization": 0,                            # no 4-bit on CPU (changed code above)
        "model.gradient-checkpointing": False,              # off, as in fedadapt (and the reentrant-checkpointing
        "train.training-arguments.gradient-checkpointing": False,  # error of an unquantized base)
        "model.lora.peft-lora-r": a.rank,
        "model.lora.peft-lora-alpha": a.alpha,
        "train.learning-rate-max": a.lr,                    # cosine from max to min over the rounds:
        "train.learning-rate-min": a.lr,                    # max = min = a constant LR, as fedadapt's
        "train.seq-length": a.flower_seq_length,
        "train.training-arguments.per-device-train-batch-size": a.batch,
        "train.training-arguments.max-steps": a.steps,
        "strategy.fraction-train": 1.0,                     # every client every round
        "num-server-rounds": a.rounds,
    }


def fedadapt_overrides(a: argparse.Namespace) -> list[str]:
    return [f"data.min_lines={a.min_lines}", f"clients_per_round={a.clients}", f"rounds={a.rounds}",
            f"train.local_steps={a.steps}", f"train.batch_size={a.batch}", f"train.lr={a.lr}",
            f"adapter.rank={a.rank}", f"adapter.alpha={a.alpha}", f"model.max_length={a.max_length}",
            "eval.every=1000", "eval.generate=0"]  # no per-round evaluation, no generations: FlowerTune has none


# ----------------------------------------------------------------------------------------------- setup

def ensure_venv() -> Path:
    """benchmarks/.work/venv-flowertune with FlowerTune's own stack; its python."""
    py = VENV / "bin" / "python"
    if VENV_READY.exists() and py.exists():
        return py
    log(f"[setup] creating the FlowerTune venv {VENV} (first use; a few minutes)")
    subprocess.run([str(PROJECT_PYTHON), "-m", "venv", "--clear", str(VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, TORCH_PIN], check=True)  # FIRST: the local CPU wheel
    subprocess.run([*pip, *FLOWERTUNE_PINS], check=True)
    VENV_READY.write_text("ok\n")
    return py


def copy_example(repo: Path, dest: Path) -> dict:
    """The example's files at the snapshot's HEAD into `dest`, CHANGES applied; its commit and the diff."""
    if not (repo / "HEAD").exists() and not (repo / ".git").exists():
        sys.exit(f"no snapshot of Flower's repository at {repo}: fetch it (the search tool's `fetch github:adap/flower`) "
                 "and pass --flower-repo DIR")
    git = ["git", "-C", str(repo)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    files = subprocess.run([*git, "ls-tree", "-r", "--name-only", "HEAD", EXAMPLE], check=True, capture_output=True,
                           text=True).stdout.split()
    if dest.exists():
        shutil.rmtree(dest)
    originals = {}
    for f in files:
        rel = f[len(EXAMPLE) + 1:]
        if not (rel.endswith(".py") or rel.endswith(".toml")) or rel == "test.py":
            continue  # README, images, the unit test: not part of the app
        text = subprocess.run([*git, "show", f"HEAD:{f}"], check=True, capture_output=True, text=True).stdout
        originals[rel] = text
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(text)
    changed = dict(originals)
    for rel, old, new, _ in CHANGES:
        n = changed[rel].count(old)
        if n != 1:
            sys.exit(f"the example changed upstream: {rel} has {n} copies of the text to replace:\n{old}")
        changed[rel] = changed[rel].replace(old, new)
    diff = []
    for rel in sorted(originals):
        if changed[rel] != originals[rel]:
            (dest / rel).write_text(changed[rel])
            diff += difflib.unified_diff(originals[rel].splitlines(True), changed[rel].splitlines(True),
                                         f"a/{EXAMPLE}/{rel}", f"b/{EXAMPLE}/{rel}")
    return {"flower_commit": commit, "files": sorted(originals), "diff": "".join(diff),
            "changes": [{"file": rel, "why": why} for rel, _, _, why in CHANGES]}


def flower_model_dir(src: Path, dest: Path) -> Path:
    """A copy of the base model folder that transformers 4.x loads: its tokenizer_config.json names the class
    `TokenizersBackend` (transformers 5), which 4.53 cannot import; the same tokenizer.json is loaded by
    PreTrainedTokenizerFast. Weights, config and tokenizer.json are byte-identical copies."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "tokenizer_config.json":
            shutil.copy2(f, dest / f.name)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dest


def prepare_data(a: argparse.Namespace, data_dir: Path) -> dict:
    """The fedadapt run's clients' training conversations (its natural partition) as one JSONL file for
    FlowerTune (alpaca-gpt4's fields: instruction, output; plus client), and its held-out conversations."""
    from fedadapt.core.config import load_config
    from fedadapt.data.tasks import client_partitions, load_task

    cfg = load_config(SCENARIO, fedadapt_overrides(a))
    task = load_task(cfg)
    parts = client_partitions(cfg, task)
    if len(parts) != a.clients:
        sys.exit(f"data.min_lines={a.min_lines} gives {len(parts)} clients, not {a.clients}: change --min-lines")
    data_dir.mkdir(parents=True, exist_ok=True)
    convs = task.train.features
    with open(data_dir / "train.jsonl", "w") as f:
        for cid, idx in sorted(parts.items()):
            for i in idx:
                (u, r) = convs[int(i)]
                assert u["role"] == "user" and r["role"] == "assistant"
                f.write(json.dumps({"client": cid, "instruction": u["content"], "output": r["content"]}) + "\n")
    with open(data_dir / "heldout.jsonl", "w") as f:
        for conv, g in zip(task.test.features, task.test.groups):
            f.write(json.dumps({"client": g, "prompt": conv[0]["content"], "response": conv[1]["content"]}) + "\n")
    return {"clients": {cid: len(idx) for cid, idx in sorted(parts.items())}, "train": sum(map(len, parts.values())),
            "heldout": len(task.test)}


BASE_CHECK = r'''
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0)
ids = torch.randint(3, 2048, (4, 64))
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
with torch.no_grad():
    torch.save(m(input_ids=ids).logits, sys.argv[2])
t = AutoTokenizer.from_pretrained(sys.argv[1])
print(json.dumps({"tokenizer": type(t).__name__, "ids": t("### Response: I humbly thank you;")["input_ids"]}))
'''


def check_same_base(flower_py: Path, base: Path, copy: Path, work: Path) -> dict:
    """The base model's logits and tokenization under FlowerTune's stack (transformers 4.53, the copy) and the
    project's (transformers 5.25, the original) on the same random ids."""
    import torch

    out = {}
    for name, py, d in (("flowertune", flower_py, copy), ("project", PROJECT_PYTHON, base)):
        r = subprocess.run([str(py), "-c", BASE_CHECK, str(d), str(work / f"logits_{name}.pt")], check=True,
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        out[name] = json.loads(r.stdout.strip().splitlines()[-1])
    diff = (torch.load(work / "logits_flowertune.pt") - torch.load(work / "logits_project.pt")).abs().max().item()
    return {"max_abs_logit_diff": diff, "same_token_ids": out["flowertune"]["ids"] == out["project"]["ids"],
            "tokenizers": {k: v["tokenizer"] for k, v in out.items()}}


# ------------------------------------------------------------------------------------------------ runs

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stray(tag: str) -> list[str]:
    return kill_processes(matching_processes(match_env=(TAG_KEY, tag)))


def run_fedadapt(a: argparse.Namespace, work: Path) -> dict:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    out, tag = work / "run", uuid.uuid4().hex
    cmd = [str(FEDADAPT_BIN), "simulate", str(SCENARIO), "--out", str(out), "--threads", str(a.threads),
           *[x for o in fedadapt_overrides(a) for x in ("--set", o)]]
    env = {**os.environ, TAG_KEY: tag, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1"}
    with open(work / "run.log", "wb") as lf:
        res = measure(cmd, env=env, match_env=(TAG_KEY, tag), cwd=str(REPO), timeout=a.timeout, stdout=lf,
                      stderr=subprocess.STDOUT)
    res["cmd"] = cmd
    problems = [] if res["rc"] == 0 else [f"exited {res['rc']}"]
    rounds = []
    if (out / "metrics.jsonl").is_file():
        rounds = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    res["round_s"] = [r["seconds"] for r in rounds if "seconds" in r]
    res["train_loss"] = [r.get("loss") for r in rounds]
    if len(res["round_s"]) != a.rounds:
        problems.append(f"{len(res['round_s'])} rounds recorded, not {a.rounds}")
    if (out / "summary.json").is_file():
        s = json.loads((out / "summary.json").read_text())
        res["fedadapt_final_loss"] = s.get("loss")  # fedadapt's own evaluation (chat rendering), a cross-check
        res["fedadapt_base_loss"] = s.get("base_loss")
    adapter = work / "peft"
    if res["rc"] == 0:
        r = subprocess.run([str(FEDADAPT_BIN), "export", str(out), "--format", "peft", "--out", str(adapter)],
                           capture_output=True, text=True, cwd=str(REPO))
        if r.returncode != 0:
            problems.append(f"export failed: {r.stderr.strip()[-500:]}")
    res["adapter"] = str(adapter) if (adapter / "adapter_config.json").is_file() else None
    stray = _stray(tag)
    if stray:
        res["killed_after"] = stray
    res["problems"], res["ok"] = problems, not problems and res["adapter"] is not None
    if not res["ok"]:
        log(f"[fedadapt] FAILED: {problems}; log {work / 'run.log'}")
    return res


def flower_env(work: Path, tag: str, port: int, ray_tmp: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "OMP_NUM_THREADS", "FEDADAPT_OVERLAY")}
    env.update({
        "PATH": f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}",  # flower-superlink etc. of this venv
        "VIRTUAL_ENV": str(VENV),
        "FLWR_HOME": str(work / "flwr_home"),
        **OFFLINE,  # no update check, no telemetry, no `uv sync` of the app's dependencies
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),  # not 39091: another benchmark's SuperLink may be up
        "FLWR_LOG_LEVEL": "DEBUG",  # Flower's log lines get timestamps (the per-round times)
        "RAY_TMPDIR": ray_tmp,  # short: Ray's socket paths must stay under 108 bytes
        "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "NO_COLOR": "1", "TERM": "dumb",
        TAG_KEY: tag,
    })
    return env


_TS = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def flower_round_times(log_text: str, rounds: int) -> tuple[list[float], dict]:
    """Seconds of each round from the ServerApp's timestamped log lines."""
    marks: dict[str, float] = {}
    for line in log_text.splitlines():
        m = _TS.search(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        r = re.search(r"\[ROUND (\d+)/(\d+)\]", line)
        if r:
            marks.setdefault(f"round{r.group(1)}", t)
        elif "Strategy execution finished" in line:
            marks.setdefault("finished", t)
        elif "Starting FedAvg strategy" in line:
            marks.setdefault("strategy_start", t)
    ends = [marks.get(f"round{k}") for k in range(2, rounds + 1)] + [marks.get("finished")]
    starts = [marks.get(f"round{k}") for k in range(1, rounds + 1)]
    if None in ends or None in starts:
        return [], marks
    return [round(e - s, 3) for s, e in zip(starts, ends)], marks


def run_flower(a: argparse.Namespace, work: Path, app: Path, model_dir: Path, train_jsonl: Path) -> dict:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    tag, port = uuid.uuid4().hex, free_port()
    ray_tmp = f"/tmp/ftray-{tag[:8]}"
    env = flower_env(work, tag, port, ray_tmp)
    overrides = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
                         for k, v in flower_run_config(model_dir, train_jsonl, a).items())
    cmd = [str(VENV / "bin" / "flwr"), "run", str(app), "local", "--stream",
           "--federation-config", f"num-supernodes={a.clients} client-resources-num-cpus={a.flower_cpus}",
           "-c", overrides]
    with open(work / "run.log", "wb") as lf:
        res = measure(cmd, env=env, match_env=(TAG_KEY, tag), cwd=str(work), timeout=a.timeout, stdout=lf,
                      stderr=subprocess.STDOUT)
    res["cmd"] = cmd
    problems = [] if res["rc"] == 0 else [f"exited {res['rc']}"]
    text = (work / "run.log").read_text(errors="replace")
    res["round_s"], marks = flower_round_times(text, a.rounds)
    if len(res["round_s"]) != a.rounds:
        problems.append(f"{len(res['round_s'])} round times found in the log, not {a.rounds}")
    res["train_loss"] = [float(x) for x in re.findall(r"Aggregated MetricRecord: \{'train_loss': ([0-9.eE+-]+)", text)]
    # `flwr run --stream` exits 0 even when the run failed (FLOWER-NOTES P5): ask the SuperLink
    try:
        ls = subprocess.run([str(VENV / "bin" / "flwr"), "ls", "local", "--format", "json"], env=env,
                            capture_output=True, text=True, timeout=60)
        runs = json.loads(ls.stdout).get("runs") or []
        res["flwr_ls_status"] = [r.get("status") for r in runs]
        if runs:
            res["flwr_ls_elapsed_s"] = runs[-1].get("elapsed")
    except Exception as e:  # noqa: BLE001
        res["flwr_ls_status"] = [f"flwr ls failed: {e!r}"]
    if res["flwr_ls_status"] != ["finished:completed"]:
        problems.append(f"flwr ls: {res['flwr_ls_status']}")
    peft_dirs = sorted((work / "results").glob(f"*/peft_{a.rounds}"))
    res["adapter"] = str(peft_dirs[-1]) if peft_dirs and (peft_dirs[-1] / "adapter_config.json").is_file() else None
    if res["adapter"] is None:
        problems.append(f"no results/*/peft_{a.rounds} adapter written by the ServerApp")
    res["killed_after"] = _stray(tag)  # the detached local SuperLink + SuperExec (and Ray, if anything is left)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    left = [p.pid for p in matching_processes(match_env=(TAG_KEY, tag))]
    if left:
        problems.append(f"processes still alive after cleanup: {left}")
    res["problems"], res["ok"] = problems, not problems
    if not res["ok"]:
        log(f"[flower] FAILED: {problems}; log {work / 'run.log'}\n{text[-3000:]}")
    return res


# ---------------------------------------------------------------------------------------------- eval

def _renderings(tok, prompt: str, response: str) -> dict[str, tuple[list[int], int]]:
    """{rendering: (token ids, index of the first scored token)}."""
    out = {}
    user = [{"role": "user", "content": prompt}]
    pre = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    p, f = tok(pre, add_special_tokens=False)["input_ids"], tok(full, add_special_tokens=False)["input_ids"]
    assert f[:len(p)] == p, "chat rendering is not prefix-stable"
    out["chat"] = (f, len(p))
    # FlowerTune: formatting_prompts_func's text, tokenized as trl 0.8.1's SFTTrainer does (special tokens on)
    pre = f"{ALPACA_PREAMBLE}\n### Instruction:\n{prompt}\n### Response:"
    p, f = tok(pre)["input_ids"], tok(f"{pre} {response}")["input_ids"]
    assert f[:len(p)] == p, "alpaca rendering is not prefix-stable"
    out["alpaca"] = (f, len(p))
    return out


def evaluate_adapters(base: Path, heldout: Path, adapters: dict[str, str | None], threads: int) -> dict:
    """{adapter label: {rendering: {loss, tokens}}}, the base model under label "base"."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(base)
    rows = [json.loads(ln) for ln in heldout.read_text().splitlines() if ln.strip()]
    data = [_renderings(tok, r["prompt"], r["response"]) for r in rows]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def score(model) -> dict:
        out = {}
        for name in ("chat", "alpaca"):
            nll, n = 0.0, 0
            for i in range(0, len(data), 64):
                chunk = [d[name] for d in data[i:i + 64]]
                width = max(len(ids) for ids, _ in chunk)
                ids = torch.full((len(chunk), width), pad)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                lab = torch.full((len(chunk), width), -100)
                for j, (x, start) in enumerate(chunk):
                    ids[j, :len(x)], mask[j, :len(x)] = torch.tensor(x), 1
                    lab[j, start:len(x)] = torch.tensor(x[start:])
                with torch.no_grad():
                    logits = model(input_ids=ids, attention_mask=mask).logits.float()
                nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), lab[:, 1:].flatten(), ignore_index=-100,
                                       reduction="sum").item()
                n += int((lab[:, 1:] != -100).sum())
            out[name] = {"loss": nll / n, "tokens": n}
        return out

    res = {"base": score(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval())}
    for label, path in adapters.items():
        if path is None:
            continue
        lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        res[label] = score(PeftModel.from_pretrained(lm, path).eval())
    return res


# --------------------------------------------------------------------------------------------- report

def _stats(vals: list[float]) -> dict | None:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def summarize_side(runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("ok")]
    return {
        "ok_runs": len(ok), "runs": len(runs),
        "warm_round_s": _stats([statistics.median(r["round_s"][1:]) for r in ok if len(r["round_s"]) > 1]),
        "round1_s": _stats([r["round_s"][0] for r in ok if r["round_s"]]),
        "wall_s": _stats([r["wall_s"] for r in ok]),
        "peak_rss_mb": _stats([r["peak_rss_mb"] for r in ok]),
        "peak_pss_mb": _stats([r["peak_pss_mb"] for r in ok]),
        "cpu_s": _stats([r.get("cpu_s") for r in ok]),
        "background_cores": _stats([r.get("background_cores") for r in ok]),
        "loss_chat": _stats([r["heldout"]["chat"]["loss"] for r in ok if r.get("heldout")]),
        "loss_alpaca": _stats([r["heldout"]["alpaca"]["loss"] for r in ok if r.get("heldout")]),
    }


def _fmt(s: dict | None, nd: int = 2) -> str:
    if not s or s.get("median") is None:
        return "–"
    if s["n"] == 1:
        return f"{s['median']:.{nd}f}"
    return f"{s['median']:.{nd}f} ({s['min']:.{nd}f}–{s['max']:.{nd}f})"


def render(data: dict) -> str:
    fa, fl = data["summary"]["fedadapt"], data["summary"]["flowertune"]
    rows = [("warm round, median of rounds 2..N (s)", "warm_round_s", 2),
            ("round 1 (s)", "round1_s", 2),
            ("whole command, wall (s)", "wall_s", 1),
            ("peak RSS, process tree (MB)", "peak_rss_mb", 0),
            ("peak PSS, process tree (MB)", "peak_pss_mb", 0),
            ("CPU time of the run's processes (s)", "cpu_s", 1),
            ("held-out loss, chat rendering (nats/token)", "loss_chat", 4),
            ("held-out loss, Alpaca rendering (nats/token)", "loss_alpaca", 4),
            ("other processes' load during the run (cores)", "background_cores", 2)]
    out = [f"| metric (median, min–max over runs) | fedadapt ({fa['ok_runs']}/{fa['runs']} ok) "
           f"| FlowerTune on Flower 1.42 ({fl['ok_runs']}/{fl['runs']} ok) | fedadapt / Flower |",
           "|---|---|---|---|"]
    for label, key, nd in rows:
        a_, b_ = fa.get(key), fl.get(key)
        ratio = "–"
        if key not in ("background_cores",) and a_ and b_ and a_["median"] and b_["median"]:
            ratio = (f"{a_['median'] - b_['median']:+.4f}" if key.startswith("loss")
                     else f"{a_['median'] / b_['median']:.2f}×")
        out.append(f"| {label} | {_fmt(a_, nd)} | {_fmt(b_, nd)} | {ratio} |")
    base = data.get("base_loss") or {}
    if base:
        out.append(f"| base model, no fine-tuning: held-out loss chat / Alpaca | {base['chat']['loss']:.4f} / "
                   f"{base['alpaca']['loss']:.4f} | (same base) | |")
    sp = data["summary"].get("speedup_warm_round")
    if sp:
        out.append("")
        out.append(f"Warm round: fedadapt is {sp:.2f}× faster than FlowerTune (ratio of the medians; goal ≥ 3×). "
                   "Loss column: fedadapt − Flower (negative: fedadapt lower).")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sides", default="fedadapt,flowertune")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--min-lines", type=int, default=200, help="chat demo roles kept (data.min_lines): 200 -> 6")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--max-length", type=int, default=96, help="fedadapt model.max_length (no conversation is longer)")
    ap.add_argument("--flower-seq-length", type=int, default=160,
                    help="FlowerTune train.seq-length: its Alpaca preamble adds ~43 tokens; 160 cuts no conversation "
                         "(96 would cut the responses of 31%% of them)")
    ap.add_argument("--threads", type=int, default=1, help="fedadapt --threads (torch threads of its one process)")
    ap.add_argument("--flower-cpus", type=float, default=1, help="Flower client-resources-num-cpus (1: 2 actors)")
    ap.add_argument("--flower-repo", type=Path, default=DEFAULT_FLOWER_REPO)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--idle-wait", type=float, default=120, help="seconds to wait for a quiet machine before a run")
    ap.add_argument("--idle-threshold", type=float, default=0.5, help="busy cores counted as quiet")
    ap.add_argument("--json", type=Path, default=RESULTS_JSON)
    ap.add_argument("--report", action="store_true", help="print the tables of --json and run nothing")
    a = ap.parse_args(argv)
    if a.report:
        data = json.loads(a.json.read_text())
        print(f"Run of {data['started_utc']}: `{data['command']}`\n\n{render(data)}")
        return 0
    sides = [s for s in a.sides.split(",") if s]

    started = utc_now()
    WORK.mkdir(parents=True, exist_ok=True)
    flower_py = ensure_venv()
    from fedadapt.runtime.demo_lm import demo_lm_dir

    base = Path(demo_lm_dir())
    data_info = prepare_data(a, WORK / "data")
    model_copy = flower_model_dir(base, WORK / "model-transformers4")
    example = copy_example(a.flower_repo, WORK / "app")
    same_base = check_same_base(flower_py, base, model_copy, WORK)
    log(f"[setup] data {data_info['train']} train / {data_info['heldout']} held-out conversations, "
        f"{len(data_info['clients'])} clients; base under both stacks: {same_base}")

    facts = machine_facts(flowertune_venv=(flower_py, ["torch", "flwr", "ray", "trl", "peft", "transformers",
                                                        "datasets", "flwr_datasets", "accelerate"]),
                          project_venv=(PROJECT_PYTHON, ["torch", "transformers", "peft"]))
    data = {"benchmark": "flowertune_vs_fedadapt", "started_utc": started, "command": command_line(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
            "machine": facts, "data": data_info, "base_model": str(base), "flower_model_copy": str(model_copy),
            "same_base_check": same_base, "example": example,
            "flower_run_config": {k: (str(v) if isinstance(v, Path) else v)
                                  for k, v in flower_run_config(model_copy, WORK / "data" / "train.jsonl", a).items()},
            "fedadapt_overrides": fedadapt_overrides(a), "runs": {s: [] for s in sides}}
    print(f"Flower example: {EXAMPLE} at {example['flower_commit']}, changes:\n\n```diff\n{example['diff']}```\n")

    for rep in range(a.repeats):
        order = sides if rep % 2 == 0 else sides[::-1]  # alternate, so a load change hits both sides alike
        for side in order:
            quiet = wait_for_quiet(side, a.idle_wait, a.idle_threshold)
            log(f"[{side}] repeat {rep + 1}/{a.repeats} (busy cores before: {quiet.busy_cores}, "
                f"load avg {quiet.loadavg_1m:.1f})")
            work = WORK / f"{side}-{rep}"
            if side == "fedadapt":
                res = run_fedadapt(a, work)
            else:
                res = run_flower(a, work, WORK / "app", model_copy, WORK / "data" / "train.jsonl")
            res.update(repeat=rep, busy_cores_before=quiet.busy_cores, waited_s=quiet.waited_s,
                       loadavg_1m_before=quiet.loadavg_1m, busy_cores_after=busy_cores())
            log(f"[{side}] rounds {res['round_s']} wall {res['wall_s']}s peak RSS {res['peak_rss_mb']} MB "
                f"PSS {res['peak_pss_mb']} MB, other load {res.get('background_cores')} cores, ok {res['ok']}")
            data["runs"][side].append(res)
            write_json(a.json, data)

    # held-out loss of every final adapter (not timed), the same way for both
    adapters = {f"{s}-{r['repeat']}": r["adapter"] for s in sides for r in data["runs"][s] if r.get("ok")}
    log(f"[eval] {len(adapters)} adapters + base on {WORK / 'data' / 'heldout.jsonl'}")
    scores = evaluate_adapters(base, WORK / "data" / "heldout.jsonl", adapters, threads=2)
    data["base_loss"] = scores["base"]
    for s in sides:
        for r in data["runs"][s]:
            r["heldout"] = scores.get(f"{s}-{r['repeat']}")
    data["summary"] = {s: summarize_side(data["runs"].get(s, [])) for s in ("fedadapt", "flowertune")}
    fa, fl = data["summary"]["fedadapt"]["warm_round_s"], data["summary"]["flowertune"]["warm_round_s"]
    data["summary"]["speedup_warm_round"] = fl["median"] / fa["median"] if fa and fl else None
    data["finished_utc"] = utc_now()
    write_json(a.json, data)
    print(f"Machine: {facts.get('cpu_model')}, {facts.get('nproc')} cores, {facts.get('mem_total_gb')} GiB; "
          f"FlowerTune venv {facts['flowertune_venv']}; project venv {facts['project_venv']}\n")
    print("Commands (one repeat):")
    for s in sides:
        r = next(iter(data["runs"][s]), None)
        if r:
            print(f"  {s}: {shlex.join(r['cmd'])}")
    print()
    print(render(data))
    print(f"\nJSON: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
