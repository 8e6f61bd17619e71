"""Runs that never lose work or silently change (one process; the engine equality under FSDP2 and
ZeRO-3 is in test_launch.py's SFT runs): the clipping rule, the guard against non-finite steps, the
DeepSpeed config checks."""

import json
import os

import pytest
import torch

from conftest import save_tiny_causal_lm, tiny_llama, lm_batches, write_sft_records
from gora_dist.launcher import checkpoint as ckpt
from gora_dist.launcher.config import load_config
from gora_dist.launcher.gradients import NonFiniteStep, clip_coefficient, scale_gradients, torch_grad_norm
from gora_dist.launcher.runner import main


@pytest.fixture(scope="module")
def sft_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("safety")
    return write_sft_records(str(folder / "animals.jsonl"), count=120), save_tiny_causal_lm(str(folder / "model"))


def sft_run(sft_folder, out, *extra, steps=10):
    data, model = sft_folder
    return ["--model", model, "--task", "sft", "--data", data, "--output-dir", str(out), "--steps", str(steps),
            "--train-examples", "100", "--eval-examples", "8", "--gora.grad_steps", "2", "--max-new-tokens", "4", *extra]


def test_the_clipping_rule_is_torchs():
    model = tiny_llama()
    for batch in lm_batches(2):
        model(**batch).loss.backward()
    params = [p for p in model.parameters()]
    clipped = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
    for param, copy in zip(params, clipped):
        copy.grad = param.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(clipped, 0.5)  # torch's rule on copies
    norm = torch_grad_norm(params)
    assert norm == pytest.approx(float(expected), rel=1e-6) and norm > 0.5
    scale_gradients(params, clip_coefficient(norm, 0.5))
    for param, check in zip(params, clipped):
        torch.testing.assert_close(param.grad, check.grad, rtol=1e-6, atol=0)
    assert clip_coefficient(0.2, 0.5) == 1.0 and clip_coefficient(5.0, 0.0) == 1.0


def test_a_diverging_run_stops_at_the_first_nonfinite_step_and_keeps_the_last_good_checkpoint(sft_folder, tmp_path):
    """lr 1e8: the loss is NaN from step 3. The run stops there naming the step; the step-2 checkpoint
    stays (never pruned, never overwritten by NaN), no final adapter or metrics are written."""
    with pytest.raises(NonFiniteStep, match=r"step 3: loss nan.*step-000002, holds finite values.*--skip-nonfinite"):
        main(sft_run(sft_folder, tmp_path, "--lr", "1e8", "--checkpoint-every", "2"))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-000002"]
    _, weights, optimizer, _ = ckpt.read_checkpoint(ckpt.latest_checkpoint(str(tmp_path)))
    assert all(bool(torch.isfinite(t).all()) for pair in weights.values() for t in pair)
    assert all(bool(torch.isfinite(t).all()) for t in optimizer.values())
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "metrics.json").exists()

    # --skip-nonfinite: the same run ends, each bad step counted and its update skipped
    skipping = tmp_path / "skipping"
    main(sft_run(sft_folder, skipping, "--lr", "1e8", "--checkpoint-every", "2", "--skip-nonfinite", steps=5))
    metrics = json.loads((skipping / "metrics.json").read_text())
    assert metrics["skipped_steps"] == [3, 4, 5] and metrics["losses"][2:] == [None, None, None]
    after = ckpt.read_checkpoint(ckpt.latest_checkpoint(str(skipping)))[1]  # step 4: nothing changed since 2
    before = ckpt.read_checkpoint(str(skipping / "checkpoints" / "step-000002"))[1]
    assert all(torch.equal(after[name][0], before[name][0]) for name in after)


def test_a_checkpoint_with_a_nonfinite_value_is_never_written(tmp_path):
    from gora_dist import GoRAConfig, estimate_plan

    plan = estimate_plan(tiny_llama(), lm_batches(2), GoRAConfig(target_modules=["q_proj"], grad_steps=2), engine="local")
    name = sorted(plan.lora_b)[-1]
    plan.lora_b[name][0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"checkpoint at step 4: lora_B of {name} holds non-finite values"):
        ckpt.write_checkpoint(str(tmp_path), 4, plan, {}, {})
    assert not os.path.exists(tmp_path / "checkpoints")  # refused before anything was made


def test_deepspeed_config_is_checked_before_anything_starts(tmp_path):
    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"gradient_clipping": 0.5}))
    with pytest.raises(ValueError, match=r"gradient_clipping=0.5 differs from max_grad_norm=1.0.*--max-grad-norm 0.5"):
        load_config(["--engine", "zero3", "--ds-config", str(good)])
    assert load_config(["--engine", "zero3", "--ds-config", str(good), "--max-grad-norm", "0.5"]).max_grad_norm == 0.5
    with pytest.raises(ValueError, match=r"with engine=fsdp2: only the zero engines read it"):
        load_config(["--engine", "fsdp2", "--ds-config", str(good), "--max-grad-norm", "0.5"])
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "zero_optimization": {"stage": 3},\n  "bf16": {"enabled": true,}\n}\n')
    with pytest.raises(ValueError, match=rf"ds_config {broken}, line 3 column \d+: invalid JSON"):
        load_config(["--engine", "zero3", "--ds-config", str(broken)])
    with pytest.raises(ValueError, match=r"ds_config='missing.json': no such file"):
        load_config(["--engine", "zero3", "--ds-config", "missing.json"])
    with pytest.raises(ValueError, match=r"max_grad_norm=-1.0: must be >= 0"):
        load_config(["--max-grad-norm", "-1"])
