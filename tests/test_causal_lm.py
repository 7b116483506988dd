"""The causal-LM task (issue 19): chat data to response-only labels, LoRA targets per architecture, every adapter
strategy on three architectures (loss goes down, bit-for-bit deterministic), DP-SGD without noise equal to plain
training, export to peft and merged folders that plain transformers/peft load with the same logits, and bad
input answered in one line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from chat import chat_file, chat_rows, chat_toml, tiny_lm  # tests/chat.py
from rich.console import Console
from safetensors.torch import load_file

from fedadapt.cli import main
from fedadapt.core.config import load_config, load_config_text
from fedadapt.models.causal_lm import IGNORE, ChatTokenizer, load_causal_lm, lora_targets
from fedadapt.models.tiny import save_tiny_causal_lm
from fedadapt.privacy.client_dp import ClientDP, DPSettings
from fedadapt.privacy.ledger import Ledger
from fedadapt.runtime import setup
from fedadapt.simulation.runner import simulate
from fedadapt.strategies.base import ModelSpec, Task
from fedadapt.strategies.registry import build
from fedadapt.training.loop import make_optimizer, train_config, train_local

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")
ARCHS = ("llama", "gpt2", "qwen2")


@pytest.fixture(scope="module")
def lms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lms")
    return {arch: tiny_lm(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return chat_file(tmp_path_factory.mktemp("chats") / "chats.jsonl")


# ------------------------------------------------------------------------------------------ data -> labels
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # the plain template, and the tokenizer's ChatML template
def test_labels_cover_exactly_the_assistant_turns_and_their_end(lms, arch):
    _, tok = load_causal_lm(str(lms[arch]), device="cpu")
    end = "<|im_end|>" if arch == "qwen2" else "</s>"
    multi = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the king"},
             {"role": "assistant", "content": "king the"}, {"role": "user", "content": "love night"},
             {"role": "assistant", "content": "love night"}]
    f = ChatTokenizer(tok, 64)([[{"role": "user", "content": "sword crown"},
                                 {"role": "assistant", "content": "crown sword"}], multi])
    learned = [tok.decode(lab[lab != IGNORE]) for lab in f.labels]
    assert learned[0].strip() == f"crown sword{end}"
    assert learned[1].replace("\n", "").replace(end, "|") == "king the|love night|"  # both turns, nothing else
    prompt_part = f.labels[0][f.inputs["attention_mask"][0].bool()][: len(f.prompts[0])]
    assert (prompt_part == IGNORE).all()  # the prompt (system, user, assistant header) is never learned
    assert f.answers == ["crown sword", "love night"] and (f.labels[0][~f.inputs["attention_mask"][0].bool()]
                                                           == IGNORE).all()  # padding is not learned either


def test_truncation_keeps_the_response_and_drops_what_has_none(lms):
    _, tok = load_causal_lm(str(lms["llama"]), device="cpu")
    long_prompt = [{"role": "user", "content": "the king " * 40}, {"role": "assistant", "content": "fair day"}]
    long_answer = [{"role": "user", "content": "lord"}, {"role": "assistant", "content": "sweet heart " * 40}]
    f = ChatTokenizer(tok, 24)([long_prompt, long_answer])
    assert f.truncated == 2 and f.dropped == 0 and f.inputs["input_ids"].shape[1] == 24
    kept = [tok.decode(lab[lab != IGNORE]) for lab in f.labels]
    assert kept[0].startswith("fair day") and kept[1].startswith("sweet heart")  # prompts cut from the left
    assert "### Assistant:" in tok.decode(f.inputs["input_ids"][1][: 24 - (f.labels[1] != IGNORE).sum()])
    assert ChatTokenizer(tok, 1)([long_prompt]).dropped == 1  # no response token left: dropped, counted


def test_lora_targets_follow_the_architecture(lms, tmp_path):
    got = {arch: lora_targets(load_causal_lm(str(lms[arch]), device="cpu")[0].encoder, []) for arch in ARCHS}
    assert got == {"llama": (["q_proj", "v_proj"], False), "gpt2": (["c_attn"], True),
                   "qwen2": (["q_proj", "v_proj"], False)}
    phi3 = save_tiny_causal_lm(tmp_path / "phi3", "llama", [r["prompt"] for r in chat_rows()], vocab_size=300)
    config = json.loads((phi3 / "config.json").read_text())  # no peft default, fused qkv_proj: every linear
    config.update(model_type="phi3", architectures=["Phi3ForCausalLM"])
    (phi3 / "config.json").write_text(json.dumps(config))
    lm = load_causal_lm(str(phi3), device="cpu")[0].encoder
    assert lora_targets(lm, []) == ("all-linear", False)
    assert lora_targets(lm, ["o_proj"]) == (["o_proj"], False)  # the user's list wins


# ------------------------------------------------------------------------------------------ every strategy
STRATEGIES = {
    "fedavg": 'name = "fedavg"',
    "fedau": 'name = "fedau"',
    "flora": 'name = "flora"\nranks = [2, 4]',
    "fedsb": 'name = "fedsb"\ninit_samples = 8',
    "ferret": 'name = "ferret"\nseeds = 16',
    "zo": 'name = "zo"\nseeds = 64\nsteps = 24\neps = 0.01',
}


def run(tmp_path: Path, toml: str, name: str) -> tuple[dict, dict, list[dict]]:
    path = tmp_path / f"{name}.toml"
    path.write_text(toml)
    out = tmp_path / name
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = simulate(load_config(path), out, console=Console(quiet=True))
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, load_file(out / "model.safetensors"), rows


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_lowers_held_out_loss_on_every_architecture_deterministically(lms, chats, tmp_path, arch,
                                                                                      strategy):
    lr = "0.3" if strategy == "zo" else "0.02"  # zeroth-order steps are far smaller than gradients
    toml = chat_toml(lms[arch], chats, strategy=STRATEGIES[strategy]).replace("lr = 0.02", f"lr = {lr}")
    summary, model, rows = run(tmp_path, toml, "a")
    assert [r["round"] for r in rows] == [1, 2] and all(not r["rejected"] and not r["skipped"] for r in rows)
    assert summary["loss"] < summary["base_loss"], summary  # the global model learned on held-out conversations
    assert math.isclose(summary["perplexity"], math.exp(summary["loss"]))
    assert 0.0 <= summary["rouge_l"] <= 1.0 and summary["generated"] == 4
    again = run(tmp_path, toml, "b")[1]
    assert model.keys() == again.keys() and all(torch.equal(model[k], again[k]) for k in model)  # same seed


def test_frl_is_refused_for_the_causal_lm_task_in_one_line(lms, chats, tmp_path, capsys):
    path = tmp_path / "frl.toml"
    path.write_text(chat_toml(lms["llama"], chats, strategy='name = "frl"'))
    assert main(["simulate", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "strategy 'frl' cannot train the causal-lm task" in err[0]
    assert "; use fedau, fedavg, fedex-lora, " in err[0] and "frl" not in err[0].split("; use ")[1]


@pytest.mark.parametrize("privacy", ['dp = "client"\nepsilon = 8.0\nsecure_aggregation = true',
                                     'dp = "central"\nepsilon = 8.0'])
def test_privacy_modes_run_on_a_causal_lm(lms, chats, tmp_path, privacy):
    toml = chat_toml(lms["gpt2"], chats, extra=f"[privacy]\n{privacy}")
    summary, _, rows = run(tmp_path, toml, "dp")
    assert all(not r["rejected"] and not r["skipped"] for r in rows)
    eps = [r["strategy"].get("privacy/epsilon_max", r["strategy"].get("privacy/epsilon")) for r in rows]
    assert all(0 < e <= 8.0 * (1 + 1e-6) for e in eps), eps


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dp_sgd_without_noise_or_clipping_is_plain_lora_training(lms, chats, arch):
    """The guard the opacus + peft failure reports ask for: per-example gradients reach exactly the LoRA factors."""
    cfg = load_config_text(chat_toml(lms[arch], chats))
    run_ = setup.load(cfg, partitions=True)
    data = run_.clients["c0"]
    models = []
    for private in (False, True):
        model = setup.load(cfg, partitions=False).model
        tc = train_config({"lr": 0.05, "local_steps": 2, "batch_size": len(data), "optimizer": "sgd"})  # q = 1
        if private:
            s = DPSettings(epsilon=1.0, delta=1e-5, noise_multiplier=0.0, max_grad_norm=math.inf, planned_rounds=1)
            ClientDP(s, Ledger(1.0, 1e-5), make_optimizer).train_local(model, data, tc, seed=4)
        else:
            train_local(model, data, tc, seed=4)
        models.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    plain, dp = models
    assert plain.keys() == dp.keys() and any("lora_B" in k for k in plain)
    for k in plain:
        assert torch.allclose(plain[k], dp[k], rtol=0, atol=1e-6), k


# ------------------------------------------------------------------------------------------ export
LOAD = """
import json, sys
import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM
peft_dir, merged_dir, ids = sys.argv[1], sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
base = AutoModelForCausalLM.from_pretrained(PeftConfig.from_pretrained(peft_dir).base_model_name_or_path)
models = [PeftModel.from_pretrained(base, peft_dir), AutoModelForCausalLM.from_pretrained(merged_dir)]
with torch.no_grad():
    print(json.dumps([m.eval()(input_ids=ids).logits.double().flatten().tolist() for m in models]))
"""


def global_logits(run_dir: Path, ids: list[list[int]]) -> torch.Tensor:
    """What fedadapt's global model of the run computes (its strategy's client side applies the state)."""
    cfg = load_config(run_dir / "config.toml")
    model = setup.load(cfg, partitions=False).model
    strategy, recipe = build(cfg.strategy, setup.settings(cfg, num_clients=1))
    strategy.init_state(ModelSpec({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    recipe.prepare(model, Task("evaluate", cfg.rounds, {}, load_file(run_dir / "model.safetensors")))
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(ids), attention_mask=torch.ones(len(ids), len(ids[0]),
                                                                                   dtype=torch.long)).double()


MORE_LORA = {"zeropad": 'name = "zeropad"\nranks = [2, 4]', "fedex-lora": 'name = "fedex-lora"\nranks = [2, 4]',
             "ffa-lora": 'name = "ffa-lora"', "flexlora": 'name = "flexlora"\nranks = [2, 4]'}


@pytest.mark.parametrize("arch,strategy", [("llama", s) for s in sorted(STRATEGIES) + sorted(MORE_LORA)]
                         + [("gpt2", "flora"), ("gpt2", "fedsb"), ("gpt2", "fedex-lora")])  # Conv1D: transposed
def test_exports_load_in_plain_peft_and_transformers_with_equal_logits(lms, chats, tmp_path, arch, strategy):
    spec = {**STRATEGIES, **MORE_LORA}[strategy]
    run(tmp_path, chat_toml(lms[arch], chats, strategy=spec, generate=0), "run")
    ids = [[1, 5, 9, 33, 70, 12, 2], [1, 44, 45, 46, 100, 3, 4]]
    mine = global_logits(tmp_path / "run", ids).flatten()
    out = {fmt: tmp_path / f"export-{fmt}" for fmt in ("peft", "merged")}
    for fmt, folder in out.items():
        assert main(["export", str(tmp_path / "run"), "--format", fmt, "--out", str(folder)]) == 0
        assert (folder / "tokenizer.json").is_file()
    p = subprocess.run([sys.executable, "-c", LOAD, str(out["peft"]), str(out["merged"]), json.dumps(ids)],
                       capture_output=True, text=True, timeout=300)  # a process that imports nothing of fedadapt
    assert p.returncode == 0, p.stderr[-2000:]
    for fmt, theirs in zip(out, json.loads(p.stdout.strip().splitlines()[-1])):
        theirs = torch.tensor(theirs, dtype=torch.float64)
        assert torch.allclose(theirs, mine, rtol=0, atol=1e-5), (fmt, float((theirs - mine).abs().max()))
    config = json.loads((out["peft"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(lms[arch].resolve()) and config["task_type"] == "CAUSAL_LM"


# ------------------------------------------------------------------------------------------ bad input
def bad_inputs(lms, chats, tmp_path) -> dict[str, tuple[str, str]]:
    """name -> (TOML, what the one-line error must say)."""
    encoder = tmp_path / "distilbert"  # an encoder only: AutoModelForCausalLM has no class for it
    from transformers import DistilBertConfig, DistilBertModel

    DistilBertModel(DistilBertConfig(vocab_size=50, dim=8, n_layers=1, n_heads=2, hidden_dim=8)).save_pretrained(
        encoder)
    nopad = tmp_path / "nopad"
    nopad_tok = tiny_lm(nopad, "llama")
    cfg = json.loads((nopad_tok / "tokenizer_config.json").read_text())
    for key in ("pad_token", "eos_token"):
        cfg.pop(key, None)
    (nopad / "tokenizer_config.json").write_text(json.dumps(cfg))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "the king", "client": "a"}\n')
    base = chat_toml(lms["llama"], chats)
    return {
        "not a causal LM": (base.replace(str(lms["llama"]), str(encoder)), "is not a causal language model"),
        "tokenizer without pad or eos": (base.replace(str(lms["llama"]), str(nopad)), "neither a pad nor an EOS"),
        "line missing its fields": (base.replace(str(chats), str(broken)), "line 1: expected 'messages', or 'prompt'"),
        "response truncated away": (base.replace("max_length = 40", "max_length = 1"), "no conversation with a "
                                                                                      "response token left"),
        "cuda without a GPU": (base.replace('device = "cpu"', 'device = "cuda"'), "has no CUDA GPU"),
        "4-bit base on the CPU": (base.replace('device = "cpu"', 'device = "cpu"\nquantize = "4bit"'), "needs a "
                                                                                                      "CUDA GPU"),
    }


def test_bad_input_ends_in_one_line(lms, chats, tmp_path, capsys):
    cases = bad_inputs(lms, chats, tmp_path)
    capsys.readouterr()  # what building the bad folders printed
    for name, (toml, needle) in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(toml)
        assert main(["simulate", str(path), "--out", str(tmp_path / "out-bad")]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (name, err)


def test_gradient_accumulation_and_checkpointing_train_the_same_adapter(lms, chats):
    """Two micro-batches of 4 per step equal one batch of 8 (the loss is a mean over conversations), and
    recomputing activations in the backward pass (gradient checkpointing) changes nothing."""
    def trained(**train) -> dict[str, torch.Tensor]:
        cfg = load_config_text(chat_toml(lms["llama"], chats), [f"train.{k}={str(v).lower()}" for k, v in train.items()])
        run_ = setup.load(cfg, partitions=True)
        data = run_.clients["c0"]
        tc = train_config({"lr": 0.05, "local_steps": 3, "batch_size": cfg.train.batch_size, "optimizer": "sgd",
                           "grad_accum_steps": cfg.train.grad_accum_steps})
        train_local(run_.model, data.subset(range(8)), tc, seed=2)  # 8 examples: every step sees all of them
        return {n: p.detach().clone() for n, p in run_.model.named_parameters() if p.requires_grad}

    plain = trained()
    for other in (trained(batch_size=4, grad_accum_steps=2), trained(gradient_checkpointing=True)):
        assert plain.keys() == other.keys()
        assert all(torch.allclose(plain[k], other[k], rtol=0, atol=1e-6) for k in plain)


CLASSIFIER = """
import json, sys
import torch
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModel
peft_dir, merged_dir, ids = sys.argv[1], sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
base = AutoModel.from_pretrained(PeftConfig.from_pretrained(peft_dir).base_model_name_or_path)
out = []
for encoder, folder in ((PeftModel.from_pretrained(base, peft_dir), peft_dir), (AutoModel.from_pretrained(merged_dir),
                                                                                merged_dir)):
    head = load_file(f"{folder}/head.safetensors")
    with torch.no_grad():
        hidden = encoder.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        out.append((hidden.mean(dim=1) @ head["weight"].T + head["bias"]).double().flatten().tolist())
print(json.dumps(out))
"""


def test_a_classifier_exports_its_encoder_and_head(tmp_path):
    """The classification task exports too: the encoder as a peft adapter (or merged) and the head beside it
    (Fed-SB: its B R A folded into LoRA factors; the default conversion is the causal-LM tests' fedavg)."""
    strategy = 'name = "fedsb"\ninit_samples = 8'
    data = tmp_path / "lines.jsonl"
    data.write_text("".join(json.dumps({"text": r["prompt"], "label": r["client"], "who": r["client"]}) + "\n"
                            for r in chat_rows(clients=3)))
    toml = tmp_path / "cls.toml"
    toml.write_text(f'seed = 1\nrounds = 2\nclients_per_round = 3\n[model]\nsource = "minilm"\nmax_length = 16\n'
                    f'[data]\ndataset = "{data}"\ngroup_field = "who"\nlabel_field = "label"\ntext_field = "text"\n'
                    f'[train]\nlr = 0.5\nlocal_steps = 2\nbatch_size = 8\n[eval]\nmax_examples = 16\n'
                    f'[strategy]\n{strategy}\n')
    assert main(["simulate", str(toml), "--out", str(tmp_path / "run")]) == 0
    cfg = load_config(tmp_path / "run" / "config.toml")
    model = setup.load(cfg, partitions=False).model
    server, recipe = build(cfg.strategy, setup.settings(cfg, num_clients=1))
    server.init_state(ModelSpec({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    recipe.prepare(model, Task("evaluate", 2, {}, load_file(tmp_path / "run" / "model.safetensors")))
    ids = [[101, 2000, 2001, 2002, 102], [101, 3000, 3001, 3002, 102]]
    with torch.no_grad():
        mine = model.eval()(input_ids=torch.tensor(ids), attention_mask=torch.ones(2, 5, dtype=torch.long))
    out = {fmt: tmp_path / fmt for fmt in ("peft", "merged")}
    for fmt, folder in out.items():
        assert main(["export", str(tmp_path / "run"), "--format", fmt, "--out", str(folder)]) == 0
        assert json.loads((folder / "head.json").read_text())["labels"] == ["c0", "c1", "c2"]
        assert (folder / "tokenizer.json").is_file()  # the encoder's own tokenizer, beside it
    p = subprocess.run([sys.executable, "-c", CLASSIFIER, str(out["peft"]), str(out["merged"]), json.dumps(ids)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    for fmt, theirs in zip(out, json.loads(p.stdout.strip().splitlines()[-1])):
        assert torch.allclose(torch.tensor(theirs, dtype=torch.float64), mine.double().flatten(), rtol=0,
                              atol=1e-5), fmt
