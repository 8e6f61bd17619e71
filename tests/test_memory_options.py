"""Options that trade compute or refuse work to bound memory: activation checkpointing in GoRA's
gradient steps, and the nuclear-norm importance metrics' refusal at sizes they cannot hold."""

import pytest
import torch

from conftest import lm_batches, tiny_llama
from gora_dist import GoRAConfig
from gora_dist import estimate_plan
from gora_dist.method.importance import nuclear_norm_bytes, nuclear_norm_refusal
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


def test_nuclear_norm_refusal_names_the_metric_the_layer_and_the_sizes():
    llama70b_mlp = {"layers.0.mlp.up_proj": (28672, 8192), "layers.0.self_attn.k_proj": (1024, 8192)}
    message = nuclear_norm_refusal("wg_nuclear", llama70b_mlp, available_bytes=2 * 2**30)
    assert "importance=wg_nuclear" in message and "layers.0.mlp.up_proj's whole 28672x8192 gradient and weight" in message
    assert "importance=mean_abs_wg" in message
    assert nuclear_norm_refusal("mean_abs_wg", llama70b_mlp, available_bytes=0) is None  # sharded: no limit
    # the need is what one rank holds at once: 1 or 3 float32 matrices, and the SVD's float64 copy and workspace
    assert nuclear_norm_bytes("grad_nuclear", 100, 40) == 100 * 40 * 4 + 8 * (100 * 40 + 40 * 40)
    fits = nuclear_norm_bytes("wg_nuclear", 28672, 8192)
    assert nuclear_norm_refusal("wg_nuclear", llama70b_mlp, available_bytes=fits) is None
    assert nuclear_norm_refusal("wg_nuclear", llama70b_mlp, available_bytes=fits - 1) is not None


def test_estimation_with_a_nuclear_norm_that_cannot_fit_stops_before_any_gradient_step(monkeypatch):
    import gora_dist.pipeline.plan

    monkeypatch.setattr(gora_dist.pipeline.plan, "free_memory_bytes", lambda device: 1000)
    config = GoRAConfig(**{**CONFIG.to_dict(), "importance": "grad_nuclear"})
    calls = []

    def counted_batches():
        for batch in lm_batches(3):
            calls.append(1)
            yield batch

    with pytest.raises(ValueError, match=r"importance=grad_nuclear: the nuclear norm needs layer model\.layers\.\d\.mlp\.down_proj"):
        estimate_plan(tiny_llama(), counted_batches(), config, engine="local")
    assert not calls


@pytest.mark.parametrize("tied", [False, True])
def test_fsdp2_shards_the_embeddings_apart_from_the_root(tied):
    """Left in the root's group they would stay gathered for a whole step; tied, they are one group."""
    from transformers import BertConfig, BertForSequenceClassification

    from gora_dist.engines.fsdp2 import default_shard_modules

    model = tiny_llama()
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    groups = default_shard_modules(model)
    assert groups[:2] == list(model.model.layers)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert groups[2:] == ([[embed, head]] if tied else [embed, head])

    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32))
    blocks = default_shard_modules(bert)  # BERT's embeddings module is itself one of its blocks: not twice
    owners = [group for group in blocks if any(m is bert.get_input_embeddings() for m in group.modules())]
    assert len(owners) == 1
