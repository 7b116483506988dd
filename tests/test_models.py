"""Model loading and adapters on the tiny config-built Llama (no hub, no download)."""

import pytest
import torch

from fedadapt.core.errors import ModelError
from fedadapt.models.adapters import adapter_state, attach_full, attach_lora, load_adapter_state, merge_adapters
from fedadapt.models.loading import load_classifier, tiny_llama


def batch(loaded, texts=("to be or not to be", "a horse, a horse")):
    f = loaded.featurize(list(texts), torch.zeros(len(texts), dtype=torch.long))
    return f.batch(torch.arange(len(texts)))[0]


def test_tiny_llama_is_a_causal_lm_and_seeded():
    a, b = tiny_llama(), tiny_llama()
    assert type(a).__name__ == "LlamaForCausalLM"
    la = load_classifier("tiny-llama", num_labels=3, seed=5).model
    lb = load_classifier("tiny-llama", num_labels=3, seed=5).model
    assert all(torch.equal(p, q) for p, q in zip(la.parameters(), lb.parameters()))


def test_lora_trains_only_adapters_and_head_with_per_client_rank_alpha():
    loaded = load_classifier("tiny-llama", num_labels=2, seed=0)
    attach_lora(loaded.model, rank=3, alpha=6.0, target_modules=["q_proj", "v_proj"])
    state = adapter_state(loaded.model)
    assert all(("lora_" in k) or k.startswith("head.") for k in state)
    a = next(v for k, v in state.items() if "q_proj.lora_A" in k)
    assert a.shape[0] == 3
    frozen = [n for n, p in loaded.model.named_parameters() if not p.requires_grad]
    assert frozen and not any("lora_" in n for n in frozen)


def test_adapter_state_round_trip_and_mismatch_errors():
    loaded = load_classifier("tiny-llama", num_labels=2, seed=0)
    attach_lora(loaded.model, rank=2, alpha=4.0)
    state = adapter_state(loaded.model)
    changed = {k: v + 1.0 for k, v in state.items()}
    load_adapter_state(loaded.model, changed)
    assert all(torch.equal(adapter_state(loaded.model)[k], changed[k]) for k in state)
    with pytest.raises(ModelError, match="does not fit"):
        load_adapter_state(loaded.model, {k: v for k, v in list(state.items())[1:]})
    k0 = next(iter(state))
    with pytest.raises(ModelError, match="shape"):
        load_adapter_state(loaded.model, {**state, k0: torch.zeros(7)})


def test_merge_gives_the_same_outputs_without_adapter_modules():
    loaded = load_classifier("tiny-llama", num_labels=2, seed=0)
    attach_lora(loaded.model, rank=4, alpha=8.0)
    state = adapter_state(loaded.model)
    g = torch.Generator().manual_seed(0)
    load_adapter_state(loaded.model, {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in state.items()})
    loaded.model.eval()
    inputs = batch(loaded)
    before = loaded.model(**inputs)
    merge_adapters(loaded.model)
    assert not any("lora_" in n for n, _ in loaded.model.named_parameters())
    assert torch.allclose(loaded.model(**inputs), before, atol=1e-5)


def test_local_hf_directory_loads_offline(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "m")  # a directory with config.json + weights, no tokenizer
    loaded = load_classifier(str(tmp_path / "m"), num_labels=2)
    attach_full(loaded.model)
    assert loaded.model(**batch(loaded)).shape == (2, 2)


def test_bad_model_sources_are_clear():
    with pytest.raises(ModelError, match="neither a built-in"):
        load_classifier("/no/such/dir", num_labels=2)
    with pytest.raises(ModelError, match="numeric features"):
        load_classifier("mlp", num_labels=2)


def test_empty_dir_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_classifier(str(tmp_path), num_labels=2)
