"""--padding-free: each micro-batch's examples in one row. The same loss and adapter gradients as
padded batches, the same GoRA plan, the same training; refused where it cannot hold. (World 2
under FSDP2 and ZeRO-3: test_launch.py's SFT runs are padding-free against a padded one process.)"""

import json

import pytest
import torch

from conftest import save_tiny_causal_lm, write_sft_records
from gora_dist.launcher.arguments import load_config
from gora_dist.launcher.models import load_model
from gora_dist.launcher.runner import main
from gora_dist.launcher.tasks import build_task
from gora_dist.launcher.tokenizer import load_tokenizer
from gora_dist.model.adapter_io import load_plan
from gora_dist.pipeline.apply import apply_plan


@pytest.fixture(scope="module")
def sft_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed")
    return write_sft_records(str(folder / "animals.jsonl"), count=120), save_tiny_causal_lm(str(folder / "model"))


def arguments(sft_folder, out, *extra):
    data, model = sft_folder
    return ["--model", model, "--task", "sft", "--data", data, "--output-dir", str(out), "--train-examples", "100",
            "--eval-examples", "8", "--gora.grad_steps", "2", "--max-new-tokens", "4", "--steps", "12",
            "--checkpoint-every", "0", *extra]


def test_one_row_per_micro_batch_with_positions_restarting(sft_folder, tmp_path):
    config = load_config(arguments(sft_folder, tmp_path, "--padding-free"))
    task = build_task(config, load_tokenizer(config.model))
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
    main(arguments(sft_folder, padded))
    main(arguments(sft_folder, free, "--padding-free"))
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
    for name, extra in (("padded", ()), ("free", ("--padding-free",))):
        config = load_config(arguments(sft_folder, tmp_path / "x", *extra))
        task = build_task(config, load_tokenizer(config.model))
        model = load_model(config.model, task="sft")
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
