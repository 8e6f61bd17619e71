"""apply_gora end to end on a tiny transformers Llama: the gradient mean, the closed form of ΔW0
against a float64 reference, γ = 0, adaptive N and γ, and every bad input of the core issue."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from conftest import lm_batches, tiny_llama
from gora_dist import GoRAConfig, apply_gora, estimate_gradients, find_target_modules, gora_modules
from gora_dist.engines import LocalEngine
from gora_dist.method.initialization import kaiming_uniform_a
from gora_dist.kernels import lora_linear_reference

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def per_batch_mean_gradient(model, batches, names, dtype=torch.float64):
    """Reference Ḡ: each batch's gradient by plain autograd on a copy of the model in ``dtype``, averaged."""
    reference = copy.deepcopy(model).to(dtype)
    sums = {name: 0 for name in names}
    for batch in batches:
        reference.zero_grad()
        reference(**batch).loss.backward()
        for name in names:
            sums[name] = sums[name] + reference.get_submodule(name).weight.grad.to(dtype)
    return {name: total / len(batches) for name, total in sums.items()}


def mean_gradients(model, batches, target_modules, steps):
    """Ḡ per target layer as (out, in) matrices, from the pipeline's own estimation on one process."""
    engine = LocalEngine(model, target_modules)
    try:
        accumulator, _, _ = estimate_gradients(engine, iter(batches), GoRAConfig(grad_steps=steps))
    finally:
        engine.close()
    means = {name: accumulator.mean(name).view(module.weight.shape) for name, module in engine.targets.items()}
    return means, accumulator


def relative_error(got, expected):
    return float(torch.linalg.norm(got.double() - expected.double()) / torch.linalg.norm(expected.double()))


def parameters_snapshot(model):
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def test_gradient_mean_is_exactly_n_steps_in_fp32_for_every_layer():
    model, batches = tiny_llama(), lm_batches(3)
    targets = find_target_modules(model, ATTENTION)
    means, accumulator = mean_gradients(model, batches, ATTENTION, 3)
    reference = per_batch_mean_gradient(model, batches, list(targets))
    assert accumulator.steps == 3
    for name in targets:  # the first layer (last in backward) included: no gradient is dropped
        mean = means[name]
        assert mean.dtype == torch.float32
        # 1e-5: float32 model vs float64 reference; dropping one of the 3 gradients would be off by ~30%
        assert relative_error(mean, reference[name]) < 1e-5, name
    # nothing else got a gradient, and the flags are as before
    assert all(param.grad is None for param in model.parameters())
    assert all(param.requires_grad for param in model.parameters())


def test_single_step_keeps_the_last_layer_in_backward():
    means, _ = mean_gradients(tiny_llama(), lm_batches(1), ["q_proj"], 1)
    assert torch.count_nonzero(means["model.layers.0.self_attn.q_proj"]) > 0


def test_bf16_model_accumulates_in_fp32():
    model = tiny_llama(dtype=torch.bfloat16)
    batches = lm_batches(4)
    means, accumulator = mean_gradients(model, batches, ["v_proj"], 4)
    for name in means:  # reference: the same bf16 gradients, each taken alone, averaged in float64
        assert accumulator.sums[name].dtype == torch.float32
        per_batch = []
        for batch in batches:
            model.zero_grad()
            model(**batch).loss.backward()
            per_batch.append(model.get_submodule(name).weight.grad.double())
        exact = torch.stack(per_batch).mean(0)
        torch.testing.assert_close(means[name].double(), exact, rtol=1e-6, atol=1e-9)
    model.zero_grad()
    report = apply_gora(model, lm_batches(4), GoRAConfig(target_modules=["v_proj"], grad_steps=4))
    for _, module in gora_modules(model):
        assert module.lora_A.dtype == torch.float32 and module.base.weight.dtype == torch.bfloat16
    assert model(**lm_batches(1)[0]).logits.dtype == torch.bfloat16
    assert report.grad_steps == 4


def test_initial_update_matches_float64_closed_form_and_base_is_untouched():
    model, batches = tiny_llama(), lm_batches(4)
    before = parameters_snapshot(model)
    config = GoRAConfig(target_modules=ATTENTION + ["down_proj"], grad_steps=4, gamma=0.05, seed=7)
    reference_grads = per_batch_mean_gradient(model, batches, list(find_target_modules(model, config.target_modules)))
    report = apply_gora(model, batches, config)

    adapters = dict(gora_modules(model))
    assert set(adapters) == set(reference_grads)
    for name, module in adapters.items():
        base_name = f"{name}.base.weight"
        assert torch.equal(module.base.weight, before[f"{name}.weight"]), base_name
        rank, in_features = module.lora_A.shape
        assert rank == report.rank_map[name] and module.scaling == pytest.approx(16.0 / math.sqrt(rank))
        assert torch.equal(module.lora_A, kaiming_uniform_a(rank, in_features, seed=7, module_name=name))
        a64 = module.lora_A.double()
        projector = a64.T @ torch.linalg.inv(a64 @ a64.T) @ a64
        expected = -0.05 * math.sqrt(in_features / rank) * reference_grads[name] @ projector
        got = module.delta_weight().double()
        assert torch.linalg.norm(got - expected) / torch.linalg.norm(expected) < 1e-4, name
    # every other parameter is unchanged too, and only adapters train
    for name, param in model.named_parameters():
        if ".lora_" in name:
            assert param.requires_grad
        else:
            key = name.replace(".base.", ".")
            assert not param.requires_grad and torch.equal(param, before[key]), name


def test_forward_equals_the_kernel_reference():
    model = tiny_llama()
    apply_gora(model, lm_batches(2), GoRAConfig(grad_steps=2, gamma=0.5))
    _, module = next(gora_modules(model))
    x = torch.randn(3, 5, module.in_features)
    expected = lora_linear_reference(x, module.base.weight, module.base.bias, module.lora_A, module.lora_B, module.scaling)
    torch.testing.assert_close(module(x), expected)


def test_gamma_zero_leaves_outputs_unchanged():
    model, batches = tiny_llama(), lm_batches(3)
    probe = lm_batches(1, seed=5)[0]
    with torch.no_grad():
        before = model(**probe).logits
    apply_gora(model, batches, GoRAConfig(grad_steps=2, gamma=0.0))
    with torch.no_grad():
        after = model(**probe).logits
    assert torch.equal(before, after)
    assert all(torch.count_nonzero(m.lora_B) == 0 for _, m in gora_modules(model))


def test_gamma_moves_the_loss_downhill():
    model, batches = tiny_llama(), lm_batches(4)
    with torch.no_grad():
        before = sum(model(**b).loss for b in batches)
    apply_gora(model, batches, GoRAConfig(grad_steps=4, gamma=0.05))
    with torch.no_grad():
        after = sum(model(**b).loss for b in batches)
    assert after < before  # the descent sign: the official HEAD's ascent step would raise it


def test_ranks_are_capped_by_layer_shape_and_value_gets_more_than_query():
    model = tiny_llama()
    report = apply_gora(model, lm_batches(4), GoRAConfig(grad_steps=4, rank_max=64, rank_ref=8, rank_min=4))
    for name, layer in report.layers.items():
        assert layer.rank <= min(layer.shape)
        assert layer.params == (layer.shape[0] + layer.shape[1]) * layer.rank
    assert report.param_count == sum(layer.params for layer in report.layers.values())
    assert report.param_budget == sum((s[0] + s[1]) * 8 for s in (l.shape for l in report.layers.values()))
    table = report.table()
    assert "model.layers.1.self_attn.v_proj" in table and f"{report.param_count:,d}" in table


def test_uniform_allocator_gives_lora_ranks_and_gora_init():
    """allocator="uniform": rank_ref on every layer (capped at min(out, in)), plain LoRA's parameter
    count, and GoRA's B0 on it: the same update as the closed form at that rank."""
    model, batches = tiny_llama(), lm_batches(2)
    config = GoRAConfig(target_modules=ATTENTION, grad_steps=2, allocator="uniform", rank_ref=8, seed=3)
    reference_grads = per_batch_mean_gradient(model, batches, list(find_target_modules(model, config.target_modules)))
    report = apply_gora(model, batches, config)
    assert report.rank_map == {name: min(8, *layer.shape) for name, layer in report.layers.items()}
    assert report.param_count == report.param_budget
    name, module = next(gora_modules(model))
    a64 = module.lora_A.double()
    expected = -0.05 * math.sqrt(module.in_features / 8) * reference_grads[name] @ (
        a64.T @ torch.linalg.inv(a64 @ a64.T) @ a64)
    assert relative_error(module.delta_weight().double(), expected) < 1e-4


def test_same_adapters_whatever_the_global_rng_state():
    first, second = tiny_llama(), tiny_llama()
    apply_gora(first, lm_batches(2), GoRAConfig(grad_steps=2))
    torch.manual_seed(12345)
    apply_gora(second, lm_batches(2), GoRAConfig(grad_steps=2))
    for (_, a), (_, b) in zip(gora_modules(first), gora_modules(second)):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)


def test_loss_fn_and_non_dict_batches():
    model = tiny_llama()
    pairs = [(b["input_ids"], b["labels"]) for b in lm_batches(2)]
    report = apply_gora(model, pairs, GoRAConfig(grad_steps=2), loss_fn=lambda m, b: m(input_ids=b[0], labels=b[1]).loss)
    assert report.grad_steps == 2


# --- adaptive N and adaptive γ -------------------------------------------------------------------

def test_adaptive_steps_stop_once_importance_settles():
    model = tiny_llama()
    same_batch = lm_batches(1) * 8
    config = GoRAConfig(grad_steps=8, adaptive_grad_steps=True, adaptive_min_steps=3, adaptive_threshold=0.1)
    assert apply_gora(model, same_batch, config).grad_steps == 3


def test_adaptive_steps_run_all_when_threshold_is_zero():
    config = GoRAConfig(grad_steps=5, adaptive_grad_steps=True, adaptive_min_steps=2, adaptive_threshold=0.0)
    assert apply_gora(tiny_llama(), lm_batches(5), config).grad_steps == 5


def test_adaptive_gamma_picks_the_best_candidate_on_the_held_batch():
    model, batches = tiny_llama(), lm_batches(4)
    held = batches[0]  # random tokens: only a batch the gradient has seen can improve
    config = GoRAConfig(grad_steps=4, adaptive_gamma=True, adaptive_gamma_candidates=30)
    report = apply_gora(model, batches, config, held_batch=held)
    losses = dict(report.gamma_search)
    assert len(report.gamma_search) == 31 and report.gamma_search[0][0] == 0.0
    assert losses[report.gamma] == min(losses.values())
    assert report.gamma > 0 and losses[report.gamma] < losses[0.0]
    with torch.no_grad():
        assert float(model(**held).loss) == pytest.approx(losses[report.gamma], rel=1e-5)


def test_adaptive_gamma_uses_the_batch_after_the_gradient_steps_by_default():
    model, batches = tiny_llama(), lm_batches(3)
    report = apply_gora(model, batches, GoRAConfig(grad_steps=2, adaptive_gamma=True, adaptive_gamma_candidates=3))
    with torch.no_grad():
        for layer in gora_modules(model):
            layer[1].lora_B.zero_()
        assert float(model(**batches[2]).loss) == pytest.approx(report.gamma_search[0][1], rel=1e-6)


def test_adaptive_gamma_keeps_zero_when_nothing_beats_the_base():
    model, batches = tiny_llama(), lm_batches(3)

    def loss_fn(m, batch):  # the held batch's loss cannot improve: it is a constant
        loss = m(**batch).loss
        return loss if torch.is_grad_enabled() else loss * 0 + 1.0

    report = apply_gora(model, batches, GoRAConfig(grad_steps=2, adaptive_gamma=True), loss_fn=loss_fn)
    assert report.gamma == 0.0
    assert all(torch.count_nonzero(m.lora_B) == 0 for _, m in gora_modules(model))


# --- bad input: clear errors, nothing lost ---------------------------------------------------------

def assert_untouched(model, snapshot):
    assert not list(gora_modules(model))
    for name, param in model.named_parameters():
        assert param.requires_grad and param.grad is None and torch.equal(param, snapshot[name]), name


def test_no_matching_module_lists_what_exists():
    with pytest.raises(ValueError, match=r"no module matches target_modules=\['qkv'\].*'down_proj'.*'q_proj'"):
        apply_gora(tiny_llama(), lm_batches(1), GoRAConfig(target_modules=["qkv"], grad_steps=1))


def test_matching_a_non_linear_module_is_named():
    with pytest.raises(ValueError, match="model.layers.0.mlp matches target_modules but is a LlamaMLP"):
        apply_gora(tiny_llama(), lm_batches(1), GoRAConfig(target_modules=["mlp"], grad_steps=1))


def test_batch_without_loss_is_named():
    model = tiny_llama()
    snapshot = parameters_snapshot(model)
    batches = [{"input_ids": b["input_ids"]} for b in lm_batches(2)]
    with pytest.raises(ValueError, match="gradient step 1: the model returned no loss; include labels"):
        apply_gora(model, batches, GoRAConfig(grad_steps=2))
    assert_untouched(model, snapshot)


def test_nan_gradient_names_the_layer_and_the_step():
    model = tiny_llama()
    snapshot = parameters_snapshot(model)
    calls = {"n": 0}

    def poison_second_step(module, args, output):
        calls["n"] += 1
        if calls["n"] == 2:  # finite loss, NaN gradient flowing into this layer's weight
            output.register_hook(lambda grad: grad * float("nan"))

    handle = model.model.layers[1].self_attn.o_proj.register_forward_hook(poison_second_step)
    with pytest.raises(ValueError, match=r"non-finite gradient .* at gradient step 2 .* in .*model.layers.1.self_attn.o_proj"):
        apply_gora(model, lm_batches(3), GoRAConfig(target_modules=["o_proj"], grad_steps=3))
    handle.remove()
    assert_untouched(model, snapshot)


def test_zero_gradient_layer_gets_rank_min_and_a_note():
    model = tiny_llama()
    silenced = "model.layers.1.self_attn.q_proj"
    model.get_submodule(silenced).register_forward_hook(lambda m, a, out: out * 0)
    report = apply_gora(model, lm_batches(2), GoRAConfig(grad_steps=2, rank_min=3, rank_ref=8))
    assert report.importance[silenced] == 0 and report.rank_map[silenced] == 3
    assert any(silenced in note and "zero gradient" in note for note in report.notes)


def test_rank_min_zero_leaves_a_dead_layer_without_adapter():
    model = tiny_llama()
    silenced = "model.layers.0.self_attn.k_proj"
    model.get_submodule(silenced).register_forward_hook(lambda m, a, out: out * 0)
    report = apply_gora(model, lm_batches(2), GoRAConfig(grad_steps=2, rank_min=0))
    assert report.rank_map[silenced] == 0
    assert type(model.get_submodule(silenced)) is nn.Linear
    assert silenced not in dict(gora_modules(model))


def test_batches_running_out_is_an_error():
    model = tiny_llama()
    snapshot = parameters_snapshot(model)
    with pytest.raises(ValueError, match="ran out after 2 of grad_steps=5"):
        apply_gora(model, lm_batches(2), GoRAConfig(grad_steps=5))
    assert_untouched(model, snapshot)


def test_failure_after_installing_rolls_the_model_back():
    model = tiny_llama()
    snapshot = parameters_snapshot(model)
    with pytest.raises(ValueError, match="adaptive_gamma needs a held batch"):
        apply_gora(model, lm_batches(2), GoRAConfig(grad_steps=2, adaptive_gamma=True))
    assert_untouched(model, snapshot)


def test_applying_twice_is_refused():
    model = tiny_llama()
    apply_gora(model, lm_batches(1), GoRAConfig(grad_steps=1))
    with pytest.raises(ValueError, match="already carries a GoRA adapter"):
        apply_gora(model, lm_batches(1), GoRAConfig(grad_steps=1))


def test_existing_gradients_are_kept_and_do_not_leak_in():
    model, batches = tiny_llama(), lm_batches(2)
    q = model.model.layers[0].self_attn.q_proj.weight
    q.grad = torch.full_like(q, 1e3)
    means, _ = mean_gradients(model, batches, ["model.layers.0.self_attn.q_proj"], 2)
    assert means["model.layers.0.self_attn.q_proj"].abs().max() < 1.0
    assert torch.equal(q.grad, torch.full_like(q, 1e3))
