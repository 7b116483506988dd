"""End-to-end simulations on tiny models: real data path, engine, strategy, outputs."""

import json

import pytest
import torch
from deploy import tiny_text_file  # tests/deploy.py
from safetensors.torch import load_file

from fedadapt.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run_cli(*args):
    return main([str(a) for a in args])


def test_tiny_llama_lora_on_user_file_end_to_end(tmp_path):
    data = tiny_text_file(tmp_path / "lines.jsonl", n_groups=6)
    out = tmp_path / "run"
    rc = run_cli("simulate", "simulations/quickstart.toml", "--out", out,
                 "--set", "model.source=tiny-llama", "--set", f"data.dataset={data}", "--set", "data.group_field=who",
                 "--set", "adapter.target_modules=[]", "--set", "rounds=3", "--set", "clients_per_round=4",
                 "--set", "train.batch_size=4", "--set", "eval.every=1")
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"round", "loss", "accuracy", "bytes_up", "bytes_down", "clients"} <= r.keys()
        assert len(r["clients"]) == 4 and r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["accuracy"] is not None
    tensors = load_file(out / "model.safetensors")
    assert any("lora_A" in k for k in tensors) and any(k.startswith("head.") for k in tensors)
    assert (out / "config.toml").is_file() and json.loads((out / "summary.json").read_text())["rounds"] == 3
    # the resolved config reruns
    assert run_cli("simulate", out / "config.toml", "--out", tmp_path / "rerun") == 0
    assert run_cli("report", out) == 0 and (out / "curves.png").stat().st_size > 1000


def test_mlp_learns_synthetic_task(tmp_path):
    out = tmp_path / "run"
    rc = run_cli("simulate", "benchmarks/trivial.toml", "--out", out, "--set", "rounds=15", "--set", "train.lr=0.5",
                 "--set", "train.local_steps=5")
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] > summary["majority_baseline"] + 0.3


def test_same_seed_bit_identical_other_seed_differs(tmp_path):
    def final(seed, name):
        run_cli("simulate", "benchmarks/trivial.toml", "--out", tmp_path / name, "--set", "rounds=3",
                "--set", f"seed={seed}", "--set", "clients_per_round=4")
        return load_file(tmp_path / name / "model.safetensors")

    a, b, c = final(1, "a"), final(1, "b"), final(2, "c")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("override, needle", [
    ("rouds=2", "unknown config key 'rouds' (did you mean 'rounds'?)"),
    ("model.source=/no/such/model", "'/no/such/model' is neither a built-in"),
    ("data.dataset=/no/such/file.jsonl", "/no/such/file.jsonl"),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, capsys, override, needle):
    rc = run_cli("simulate", "benchmarks/trivial.toml", "--out", tmp_path / "x", "--set", override)
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_client_without_examples_is_named(tmp_path, capsys):
    # 3 examples cannot make 10 IID clients: the error names a client and what to change
    rc = run_cli("simulate", "benchmarks/trivial.toml", "--out", tmp_path / "x", "--set", "data.num_examples=12",
                 "--set", "data.num_clients=10")
    err = capsys.readouterr().err
    assert rc == 2 and "client" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("dataset", ["digits", "mnist1d"])
def test_bundled_vector_datasets_run_with_dirichlet_clients(tmp_path, dataset):
    out = tmp_path / dataset
    rc = run_cli("simulate", "benchmarks/trivial.toml", "--out", out, "--set", f"data.dataset={dataset}",
                 "--set", "data.partition=dirichlet", "--set", "data.alpha=0.5", "--set", "rounds=2")
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["accuracy"] is not None
