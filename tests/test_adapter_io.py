"""Adapters on disk: PEFT loads ours with equal outputs, the single-rank server export reads right
with a plain reader, our loader round-trips, merging folds exactly, and nothing is unpickled."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

import gora_dist
from conftest import lm_batches, tiny_llama
from gora_dist import GoRAConfig, apply_gora, gora_modules, load_adapter, merge_adapters, save_adapter, save_uniform_adapter

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def adapted():
    """A tiny Llama with GoRA on all 7 projections (ranks differ per layer), and its report."""
    model = tiny_llama()
    report = apply_gora(model, lm_batches(4), GoRAConfig(target_modules=TARGETS, grad_steps=4, gamma=0.3, rank_max=24))
    assert len(set(report.rank_map.values())) > 2  # heterogeneous ranks, or the test proves little
    return model, report


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def test_peft_loads_our_adapter_with_equal_outputs(adapted, tmp_path):
    model, report = adapted
    save_adapter(model, tmp_path, report)
    probe = lm_batches(1, seed=9)[0]
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert type(loaded).__name__ == "PeftModelForCausalLM"
    torch.testing.assert_close(logits(loaded, probe), logits(model, probe), rtol=0, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(logits(tiny_llama(), probe), logits(model, probe), atol=1e-4)  # the adapter matters
    for name, module in gora_modules(model):  # each layer got its own rank and rsLoRA scale in PEFT
        peft_layer = loaded.base_model.model.get_submodule(name)
        assert peft_layer.r["default"] == module.rank
        assert peft_layer.scaling["default"] == pytest.approx(module.scaling)


def test_files_and_metadata(adapted, tmp_path):
    model, report = adapted
    save_adapter(model, tmp_path, report)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "gora.json"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is True and config["lora_alpha"] == 16.0
    assert len(config["rank_pattern"]) == len(report.rank_map)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 2 * len(report.rank_map)
    assert all(key.startswith("base_model.model.") and key.endswith((".lora_A.weight", ".lora_B.weight")) for key in tensors)
    gora = json.loads((tmp_path / "gora.json").read_text())
    assert gora["rank_map"] == report.rank_map and gora["importance"] == report.importance
    assert gora["config"]["target_modules"] == TARGETS and gora["versions"]["torch"]
    assert gora["param_count"] == report.param_count and gora["export"] == "peft"


def test_our_loader_round_trips_and_never_unpickles(adapted, tmp_path, monkeypatch):
    model, report = adapted
    save_adapter(model, tmp_path, report)

    def refuse(*args, **kwargs):
        raise AssertionError("loading must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    fresh = tiny_llama()
    loaded_report = load_adapter(fresh, tmp_path)
    probe = lm_batches(1, seed=9)[0]
    torch.testing.assert_close(logits(fresh, probe), logits(model, probe), rtol=0, atol=0)
    assert loaded_report.rank_map == report.rank_map
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == [n for n, p in model.named_parameters() if p.requires_grad]


def test_loader_refuses_a_model_that_does_not_fit(adapted, tmp_path):
    model, report = adapted
    save_adapter(model, tmp_path, report)
    other = tiny_llama()
    other.model.layers[1].self_attn.v_proj = torch.nn.Linear(48, 40, bias=False)
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.v_proj: adapter shapes .* do not fit"):
        load_adapter(other, tmp_path)
    assert not list(gora_modules(other))  # nothing half-applied


def test_merge_folds_adapters_into_plain_linears(adapted):
    model, _ = adapted
    probe = lm_batches(1, seed=9)[0]
    expected = logits(model, probe)
    merge_adapters(model)
    assert not list(gora_modules(model))
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(model, probe), expected, rtol=1e-5, atol=1e-5)  # fp32 reassociation


def plain_single_rank_reader(model, path):
    """How a server that ignores rank_pattern reads an adapter: one r, one alpha, scale alpha/r."""
    config = json.loads(open(os.path.join(path, "adapter_config.json")).read())
    assert not config.get("use_rslora")
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    names = {key[len("base_model.model."):].rsplit(".lora_", 1)[0] for key in tensors}
    for name in names:
        lora_a = tensors[f"base_model.model.{name}.lora_A.weight"]
        lora_b = tensors[f"base_model.model.{name}.lora_B.weight"]
        model.get_submodule(name).register_forward_hook(
            lambda module, args, out, a=lora_a, b=lora_b: out + scale * (args[0] @ a.T) @ b.T
        )
    return model


@pytest.mark.parametrize("pad", [False, True])
def test_uniform_export_reads_right_with_one_rank_and_one_alpha(adapted, tmp_path, pad):
    model, report = adapted
    save_uniform_adapter(model, tmp_path, report, pad_to_max_rank=pad)
    probe = lm_batches(1, seed=9)[0]
    reader = plain_single_rank_reader(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(reader, probe), logits(model, probe), rtol=1e-5, atol=1e-5)
    shapes = {tuple(t.shape) for k, t in load_file(tmp_path / "adapter_model.safetensors").items() if "lora_A" in k}
    max_rank = max(report.rank_map.values())
    if pad:  # one rank everywhere: PEFT, which reads r for every module, loads it too
        assert {s[0] for s in shapes} == {max_rank}
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
        torch.testing.assert_close(logits(loaded, probe), logits(model, probe), rtol=1e-5, atol=1e-5)
    else:
        assert len({s[0] for s in shapes}) > 1
    with pytest.raises(ValueError, match="'uniform' export"):
        load_adapter(tiny_llama(), tmp_path)


def test_a_failed_save_leaves_the_previous_adapter_intact(adapted, tmp_path, monkeypatch):
    model, report = adapted
    save_adapter(model, tmp_path, report)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    with torch.no_grad():
        next(gora_modules(model))[1].lora_B.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gora_dist.model.adapter_io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path, report)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    assert not [p for p in os.listdir(tmp_path.parent) if p.startswith(".gora-tmp-")]


def test_saving_a_model_without_adapters_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no GoRA adapters"):
        save_adapter(tiny_llama(), tmp_path / "x")


def test_a_classifier_head_is_trained_and_saved_as_peft_modules_to_save(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    def tiny_bert():
        torch.manual_seed(0)
        config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, num_labels=3)
        return BertForSequenceClassification(config).eval()

    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 60, (4, 9), generator=generator),
                "labels": torch.randint(0, 3, (4,), generator=generator)} for _ in range(3)]
    model = tiny_bert()
    config = GoRAConfig(target_modules=["query", "value"], modules_to_save=["classifier"], grad_steps=3, gamma=0.3,
                        rank_min=2, rank_ref=4, rank_max=8)
    report = apply_gora(model, batches, config)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert "classifier.weight" in trainable and "classifier.bias" in trainable
    assert all(".lora_" in n or n.startswith("classifier.") for n in trainable)
    with torch.no_grad():  # as if trained: the head must travel with the adapter
        model.classifier.weight.add_(0.5)
    save_adapter(model, tmp_path, report)
    config_json = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config_json["task_type"] == "SEQ_CLS" and config_json["modules_to_save"] == ["classifier"]
    probe = batches[0]["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=probe).logits
        loaded = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path)
        torch.testing.assert_close(loaded(input_ids=probe).logits, ours, rtol=0, atol=1e-6)
        fresh = tiny_bert()
        load_adapter(fresh, tmp_path)
        torch.testing.assert_close(fresh(input_ids=probe).logits, ours, rtol=0, atol=0)
    assert fresh.classifier.weight.requires_grad
