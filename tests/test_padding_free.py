"""--padding-free: each micro-batch's examples in one row. The same loss and adapter gradients as
padded batches, the same GoRA plan, the same training; refused where it cannot hold. (World 2
under FSDP2 and ZeRO-3: test_launch.py's SFT runs are padding-free against a padded one process.)"""

import json

import pytest
import torch

from gora_dist.launcher.arguments import load_config
from gora_dist.launcher.models import load_model
from gora_dist.launcher.runner import main
from gora_dist.launcher.tasks import build_task
from gora_dist.launcher.tokenizer import load_tokenizer
from gora_dist.model.adapter_io import load_plan
from gora_dist.pipeline.apply import apply_plan


def arguments(sft_folder, out, *extra):
    data, model = sft_folder
    return ["--model", model, "--task", "sft", "--data", data, "--output-dir", str(out), "--train-examples", "100",
            "--eval-examples", "8", "--gora.grad_steps", "2", "--max-new-tokens", "4", "--steps", "12",
            "--checkpoint-every", "0", *extra]


def test_one_row_per_micro_batch_with_positions_restarting(sft_folder, tmp_path):
    config = load_config(arguments(sft_folder, tmp_path))  # the default for sft where the model can
    task = build_task(config, load_tokenizer(config.model))
    assert task.check_model(load_model(config.model, task="sft")).startswith("batches: padding-free rows")
    examples = task.train[:3]
    batch = task.batch(examples)
    lengths = [len(example.ids) for example in examples]
    assert batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    starts = [sum(lengths[:i]) for i in range(3)]
    assert all(batch["labels"][0, start] == -100 for start in starts)  # nothing predicts an example's first token
    assert batch["num_items_in_batch"] == sum(example.response_tokens for example in examples)


def test_padding_free_gives_the_padded_loss_gradients_plan_and_training(sft_folder, tmp_path):
    padded, free = tmp_path / "padded", tmp_path / "free"
    main(arguments(sft_folder, padded, "--padding-free", "false"))
    main(arguments(sft_folder, free))  # padding-free: the default
    one, two = (json.loads((out / "metrics.json").read_text()) for out in (padded, free))
    plan_a, plan_b = load_plan(str(padded / "init")), load_plan(str(free / "init"))
    assert plan_a.rank_map == plan_b.rank_map
    for name in plan_a.lora_a:
        assert torch.equal(plan_a.lora_a[name], plan_b.lora_a[name])
        difference = torch.linalg.norm(plan_a.lora_b[name] - plan_b.lora_b[name]) / torch.linalg.norm(plan_a.lora_b[name])
        assert difference < 1e-5, name  # float32 sums in another order
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["response_nll_after"] == pytest.approx(one["response_nll_after"], rel=1e-5)

    # one micro-batch's loss and every adapter's gradient, both layouts, the same model
    layouts = {}
    for name, extra in (("padded", ("--padding-free", "false")), ("free", ("--padding-free",))):
        config = load_config(arguments(sft_folder, tmp_path / "x", *extra))
        task = build_task(config, load_tokenizer(config.model))
        model = load_model(config.model, task="sft")
        task.check_model(model)
        assert ("position_ids" in task.batch(task.train[:2])) == (name == "free")
        apply_plan(model, plan_a)
        loss = model(**task.batch(task.train[:8])).loss
        loss.backward()
        layouts[name] = (float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    (loss_a, grads_a), (loss_b, grads_b) = layouts["padded"], layouts["free"]
    assert loss_b == pytest.approx(loss_a, rel=1e-6) and grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        assert torch.linalg.norm(grads_b[name] - grads_a[name]) / torch.linalg.norm(grads_a[name]) < 1e-5, name


def test_padding_free_is_refused_where_it_cannot_hold(sft_folder, tmp_path):
    with pytest.raises(ValueError, match=r"padding_free is for task=sft"):
        load_config(["--task", "seq-cls", "--padding-free"])
    config = load_config(arguments(sft_folder, tmp_path, "--padding-free"))
    task = build_task(config, load_tokenizer(config.model))
    model = load_model(config.model, task="sft")
    model.config._attn_implementation = "some_kernel"
    with pytest.raises(ValueError, match=r"padding_free: LlamaForCausalLM \(attention 'some_kernel'\) cannot keep"):
        task.check_model(model)
    # not asked for: such a model trains on padded rows, and the run says why
    task = build_task(load_config(arguments(sft_folder, tmp_path)), load_tokenizer(config.model))
    line = task.check_model(model)
    assert "right-padded rows (LlamaForCausalLM, attention 'some_kernel', cannot take" in line
    assert "attention_mask" in task.batch(task.train[:2])


@pytest.mark.parametrize("layout", ["padded", "padding-free"])
def test_the_loss_with_logits_at_targets_only_is_the_models_loss(sft_folder, tmp_path, monkeypatch, layout):
    """The same value and the same adapter gradients as ``model(**batch).loss`` over full logits,
    with the cross-entropy in chunks smaller than the batch's target positions."""
    from gora_dist.launcher.tasks import sft_loss

    monkeypatch.setattr(sft_loss, "CHUNK_POSITIONS", 4)
    config = load_config(arguments(sft_folder, tmp_path, "--padding-free", "true" if layout == "padding-free" else "false"))
    task = build_task(config, load_tokenizer(config.model))
    model = load_model(config.model, task="sft")
    task.check_model(model)
    assert task.loss_fn is sft_loss.response_loss
    apply_plan(model, load_plan_for(model, sft_folder, tmp_path))
    batch = task.batch(task.train[:6], global_batch=task.train[:12], share=2)
    assert len(sft_loss.target_positions(batch["labels"])) > 2 * 4  # several chunks
    results = []
    for compute in (lambda: model(**batch).loss, lambda: sft_loss.response_loss(model, batch)):
        model.zero_grad()
        loss = compute()
        loss.backward()
        results.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (full, full_grads), (kept, kept_grads) = results
    assert kept == pytest.approx(full, rel=1e-6)
    for name, grad in full_grads.items():
        assert torch.linalg.norm(kept_grads[name] - grad) / torch.linalg.norm(grad) < 1e-5, name


def load_plan_for(model, sft_folder, tmp_path):
    """A GoRA plan for the test model (adapters to take gradients), from an --init-only run."""
    main(arguments(sft_folder, tmp_path / "init-run", "--init-only"))
    return load_plan(str(tmp_path / "init-run" / "init"))


@pytest.mark.parametrize("kept", [False, True], ids=["logits overwritten", "logits kept by their producer"])
def test_chunked_cross_entropy_matches_torchs(kept):
    """Value and gradient of the chunked loss against F.cross_entropy, whether the logits may be
    overwritten by their gradient (a linear head's output) or are kept for a backward (a tanh's)."""
    from gora_dist.launcher.tasks.sft_loss import chunked_cross_entropy_sum

    torch.manual_seed(0)
    source = torch.randn(2, 11, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 37, dtype=torch.float64)
    targets = torch.randint(0, 37, (2, 11))
    targets[0, :4] = -100
    results = []
    for ours in (False, True):
        source.grad = None
        logits = torch.tanh(source @ weight) * 3 if kept else source @ weight
        loss = chunked_cross_entropy_sum(logits, targets, 3) if ours else torch.nn.functional.cross_entropy(
            logits.reshape(-1, 37).float(), targets.reshape(-1), ignore_index=-100, reduction="sum")
        (loss * 0.5).backward()
        results.append((float(loss), source.grad.clone()))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)
