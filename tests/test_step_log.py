"""The launcher's per-step log: train_log.jsonl, TensorBoard, loss.png, --epochs (one process; the
gradient norm at world 2 is compared with one process's in test_launch.py's SFT runs)."""

import json
import math

import pytest
import torch

from gora_dist.launcher.arguments import load_config
from gora_dist.launcher.runner import main
from gora_dist.launcher.step_log import batch_counts, read_log

FIELDS = ("loss", "lr", "grad_norm", "step_s", "tokens", "real_tokens", "trained_tokens", "real_tokens_per_s",
          "trained_tokens_per_s", "peak_memory_gb", "peak_memory")


def run(sft_folder, out, *extra):
    data, model = sft_folder
    main(["--model", model, "--task", "sft", "--data", data, "--output-dir", str(out), "--train-examples", "100",
          "--eval-examples", "8", "--gora.grad_steps", "2", "--max-new-tokens", "4", *extra])
    return json.loads((out / "metrics.json").read_text())


def test_counts_of_a_batch():
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]),
             "labels": torch.tensor([[-100, -100, 7, 8, -100], [-100, 4, 5, -100, -100]])}
    assert batch_counts(batch) == (10, 8, 4, 5**2 + 3**2)  # the label at position 0 is never predicted
    assert batch_counts({"input_ids": torch.zeros(3, 4), "labels": torch.tensor([0, 2, 1])}) == (12, 12, 3, 3 * 4**2)
    free = {"input_ids": torch.zeros(1, 5, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1]]),
            "labels": torch.tensor([[-100, 5, 6, -100, 7]])}
    assert batch_counts(free) == (5, 5, 3, 3**2 + 2**2)  # padding-free: examples where positions restart


def test_model_flops_of_a_lora_step_count_what_the_formula_says(sft_folder):
    """The FLOPs formula of launcher/flops.py on the tiny Llama (hidden 64, MLP 120, 4 query heads of
    16, 2 key/value heads, 2 layers), counted by hand: 4 per frozen linear weight and 6 per adapter
    parameter a real token, 12·layers·64·n² for an n-token example's attention, the head only at the
    trained positions; the peak from --peak-tflops, none on the CPU without it."""
    from gora_dist.launcher.flops import model_shape, peak_flops, step_flops
    from gora_dist.model.layers import GoRALinear
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sft_folder[1])
    attention = model.model.layers[0].self_attn
    attention.q_proj = GoRALinear(attention.q_proj, 4, alpha=8)
    attention.v_proj = GoRALinear(attention.v_proj, 2, alpha=8)
    shape = model_shape(model)
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 120
    vocab = model.config.vocab_size
    assert (shape.linear, shape.head, shape.layers, shape.attention_width) == (2 * per_layer, vocab * 64, 2, 64)
    assert shape.adapters == 4 * (64 + 64) + 2 * (64 + 32)
    trained = 7  # two examples of 10 and 30 tokens: 40 real tokens, 10² + 30² = 1,000
    expected = (4 * 2 * per_layer + 6 * shape.adapters) * 40 + 12 * 2 * 64 * (100 + 900) + 4 * vocab * 64 * trained
    assert step_flops(shape, 40, 1000, trained) == expected
    assert peak_flops(torch.device("cpu"), torch.float32)[0] is None
    assert peak_flops(torch.device("cpu"), torch.float32, 2.5) == (2.5e12, "--peak-tflops")


def test_every_step_is_a_line_with_its_counts_and_the_same_losses_as_metrics(sft_folder, tmp_path):
    metrics = run(sft_folder, tmp_path, "--epochs", "1", "--eval-every", "5", "--report-to", "tensorboard")
    steps, evals = read_log(str(tmp_path), "step"), read_log(str(tmp_path), "eval")
    assert len(steps) == math.ceil(100 / 8) == len(metrics["losses"])  # --epochs 1: 13 steps of 8
    assert [line["step"] for line in steps] == list(range(1, 14))
    assert [line["loss"] for line in steps] == metrics["losses"]
    assert [line["grad_norm"] for line in steps] == metrics["grad_norms"]
    for line in steps:
        assert set(FIELDS) <= set(line) and line["peak_memory"] == "cpu_peak_rss"
        assert line["tokens"] >= line["real_tokens"] > line["trained_tokens"] > 0
        assert line["trained_tokens_per_s"] == pytest.approx(line["trained_tokens"] / line["step_s"])
    assert all("mfu" not in line and line["model_tflops_per_s"] > 0 for line in steps)  # no peak on the CPU
    assert steps[0]["lr"] > steps[-1]["lr"]  # the schedule over the 13 steps
    assert [e["step"] for e in evals] == [0, 5, 10, 13]
    assert evals[-1]["response_nll"] == pytest.approx(metrics["response_nll_after"])
    assert (tmp_path / "loss.png").stat().st_size > 5_000

    # TensorBoard's own reader sees the same losses
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    read = [(event.step, event.value) for event in events.Scalars("train/loss")]
    assert read == [(step, pytest.approx(loss, rel=1e-6)) for step, loss in enumerate(metrics["losses"], start=1)]
    assert [event.step for event in events.Scalars("eval/response_nll")] == [0, 5, 10, 13]


def test_a_resumed_run_keeps_its_log_up_to_the_checkpoint(sft_folder, tmp_path):
    run(sft_folder, tmp_path, "--steps", "6", "--checkpoint-every", "3", "--peak-tflops", "0.001")
    lines = read_log(str(tmp_path), "step")
    assert all(line["mfu"] == pytest.approx(line["model_tflops_per_s"] / 0.001) for line in lines)
    with open(tmp_path / "train_log.jsonl", "a") as handle:  # a line the interrupted run wrote past its checkpoint
        handle.write(json.dumps({"kind": "step", "step": 7, "loss": 0.0}) + "\n")
    run(sft_folder, tmp_path, "--steps", "8", "--checkpoint-every", "3", "--resume", "--peak-tflops", "0.001")
    after = read_log(str(tmp_path), "step")
    assert [line["step"] for line in after] == list(range(1, 9)) and after[:6] == lines


def test_steps_or_epochs_not_both():
    with pytest.raises(ValueError, match=r"steps=5 and epochs=2.0: give one of them"):
        load_config(["--steps", "5", "--epochs", "2"])
    with pytest.raises(ValueError, match=r"report_to='mlflow' is not one of"):
        load_config(["--report-to", "mlflow"])
