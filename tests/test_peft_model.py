"""to_peft: a GoRA plan as a PEFT LoRA model that computes what GoRA's own layers compute, before
and after training, through save_pretrained/from_pretrained and merge_and_unload."""

import copy

import pytest
import torch

from conftest import lm_batches, tiny_llama
from gora_dist import GoRAConfig, apply_plan, load_plan, save_plan, to_peft
from gora_dist import estimate_plan

peft = pytest.importorskip("peft")

CONFIG = GoRAConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                    grad_steps=3, rank_min=1, rank_ref=4, rank_max=8, gamma=0.5)
# Both compute base(x) + ((x·Aᵀ)·Bᵀ)·s in float32 with the same operations, and AdamW updates the
# same tensors: here the logits are bit-equal before and after training; the tolerance only leaves
# room for another PEFT version reordering a product (float32 rounding, ~1e-7 relative).
TOLERANCE = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def plan():
    return estimate_plan(tiny_llama(), lm_batches(3), CONFIG, engine="local")


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def train(model, batches, steps=4):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for batch in batches[:steps]:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return sum(p.numel() for p in params)


def test_the_peft_model_computes_what_gora_layers_compute(plan, tmp_path):
    batch = lm_batches(1, seed=9)[0]
    ours = tiny_llama()
    apply_plan(ours, plan)
    theirs = to_peft(tiny_llama(), plan)
    assert isinstance(theirs, peft.PeftModel)
    assert not torch.allclose(logits(ours, batch), logits(tiny_llama(), batch), atol=1e-3)  # the initial update shows
    torch.testing.assert_close(logits(theirs, batch), logits(ours, batch), **TOLERANCE)
    for name, rank in plan.rank_map.items():  # PEFT's layer has the plan's rank and rsLoRA's scale
        layer = theirs.base_model.model.get_submodule(name)
        assert layer.r["default"] == rank and layer.scaling["default"] == pytest.approx(CONFIG.alpha / rank ** 0.5)
    assert len(set(plan.rank_map.values())) > 1  # heterogeneous ranks exercised

    data = lm_batches(4, seed=3)
    assert train(ours, data) == train(theirs, data)  # the same trainable parameters, counted
    torch.testing.assert_close(logits(theirs, batch), logits(ours, batch), **TOLERANCE)

    theirs.save_pretrained(tmp_path / "peft")
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(logits(reloaded, batch), logits(theirs, batch), rtol=0, atol=0)
    merged = reloaded.merge_and_unload()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, batch), logits(ours, batch), rtol=1e-5, atol=1e-5)  # W + s·BA rounded into W


def test_a_saved_plan_reads_back_and_goes_into_peft(plan, tmp_path):
    save_plan(plan, tmp_path / "plan")
    again = load_plan(tmp_path / "plan")
    assert again.rank_map == plan.rank_map
    batch = lm_batches(1, seed=9)[0]
    torch.testing.assert_close(logits(to_peft(tiny_llama(), again), batch), logits(to_peft(tiny_llama(), plan), batch),
                               rtol=0, atol=0)


def test_bad_inputs_are_named_and_leave_the_model_alone(plan):
    model = tiny_llama()
    apply_plan(model, plan)
    with pytest.raises(ValueError, match="already has GoRA layers"):
        to_peft(model, plan)
    small = tiny_llama(intermediate_size=64)
    before = copy.deepcopy(small.state_dict())
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj: adapter shapes .* do not fit"):
        to_peft(small, plan)
    assert not any("lora" in name for name in small.state_dict())
    assert all(torch.equal(before[key], value) for key, value in small.state_dict().items())
