"""Options that trade compute or refuse work to bound memory: activation checkpointing in GoRA's
gradient steps, and the nuclear-norm importance metrics' refusal at sizes they cannot hold."""

import pytest
import torch

from conftest import lm_batches, tiny_llama
from gora_dist import GoRAConfig
from gora_dist.distributed import estimate_plan
from gora_dist.launcher.models import checkpointing_in_eval_mode, enable_gradient_checkpointing

CONFIG = GoRAConfig(target_modules=["q_proj", "v_proj", "down_proj"], grad_steps=3, rank_min=2, rank_ref=4, rank_max=8)


def count_mlp_forwards(monkeypatch) -> list:
    """One entry per LlamaMLP forward (module hooks do not run in a checkpoint's recomputation)."""
    from transformers.models.llama import modeling_llama

    calls, forward = [], modeling_llama.LlamaMLP.forward

    def counted(self, x):
        calls.append(1)
        return forward(self, x)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)
    return calls


def test_gradient_checkpointing_recomputes_each_block_in_estimation_and_keeps_the_plan(monkeypatch):
    plain = estimate_plan(tiny_llama(), lm_batches(3), CONFIG, engine="local")
    model = tiny_llama()
    enable_gradient_checkpointing(model)
    calls = count_mlp_forwards(monkeypatch)
    with checkpointing_in_eval_mode(model):
        checkpointed = estimate_plan(model, lm_batches(3), CONFIG, engine="local")
    assert len(calls) == 2 * 2 * 3  # 2 blocks x (each step's forward and its recomputation in backward) x 3 steps
    assert not model.training and not any(m.training for m in model.modules())  # eval mode as before (no dropout)
    assert checkpointed.rank_map == plain.rank_map
    for name in plain.lora_b:
        torch.testing.assert_close(checkpointed.lora_b[name], plain.lora_b[name], rtol=1e-5, atol=1e-7)


def test_without_the_eval_mode_switch_transformers_would_not_checkpoint_estimation(monkeypatch):
    model = tiny_llama()
    enable_gradient_checkpointing(model)
    calls = count_mlp_forwards(monkeypatch)
    estimate_plan(model, lm_batches(3), CONFIG, engine="local")
    assert len(calls) == 2 * 3  # eval mode: transformers skips checkpointing, so the switch above is needed


def test_a_model_without_checkpointing_support_is_named():
    with pytest.raises(ValueError, match="gradient_checkpointing: Linear does not support it"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
