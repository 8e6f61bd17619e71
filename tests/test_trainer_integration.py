"""GoRA in a transformers Trainer script: prepare_gora before Trainer(...), GoRAAdapterSaver for
PEFT-format adapters in every checkpoint. One process here; the engine choice is the same code."""

import os

import pytest
import torch

from conftest import lm_batches, tiny_llama
from gora_dist import GoRAConfig, gora_modules
from gora_dist.integrations import GoRAAdapterSaver, prepare_gora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


class TokenDataset(torch.utils.data.Dataset):
    """64 sequences that repeat a short pattern, so a few steps visibly lower the loss."""

    def __init__(self):
        rows = lm_batches(1, batch_size=8, length=6, seed=3)[0]["input_ids"]
        self.items = [rows[i % 8].repeat(3) for i in range(64)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        ids = self.items[index]
        return {"input_ids": ids, "labels": ids.clone()}


def test_trainer_trains_gora_adapters_and_saves_them_in_peft_format(tmp_path):
    model, dataset = tiny_llama(), TokenDataset()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=12, learning_rate=5e-3,
        save_steps=6, logging_steps=1, report_to=[], use_cpu=True, seed=0, lr_scheduler_type="constant",
    )
    plan = prepare_gora(model, dataset, GoRAConfig(grad_steps=4, target_modules=["q_proj", "v_proj", "o_proj"]), args=args)
    assert plan.report.grad_steps == 4 and len(plan.rank_map) == 6
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[GoRAAdapterSaver(plan)])
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.2, losses
    for name, param in model.named_parameters():  # only adapters moved
        if ".lora_" not in name:
            assert torch.equal(param, before[name.replace(".base.", ".")]), name
    moved = [not torch.equal(m.lora_B.detach(), plan.lora_b[n]) for n, m in gora_modules(model)]
    assert all(moved)

    for folder in (tmp_path / "checkpoint-6" / "gora_adapter", tmp_path / "gora_adapter"):
        assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors", "gora.json"]
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "gora_adapter")
    probe = dataset[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=probe).logits, model(input_ids=probe).logits, rtol=0, atol=1e-5)
