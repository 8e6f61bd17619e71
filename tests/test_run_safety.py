"""Runs that never lose work or silently change (one process; the engine equality under FSDP2 and
ZeRO-3 is in test_launch.py's SFT runs): the clipping rule, the guard against non-finite steps, the
DeepSpeed config checks."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_llama, lm_batches
from gora_dist.launcher import checkpoint as ckpt
from gora_dist.launcher.arguments import load_config
from gora_dist.launcher.gradients import NonFiniteStep, clip_coefficient, scale_gradients, torch_grad_norm
from gora_dist.launcher.preemption import PREEMPTED_EXIT
from gora_dist.launcher.runner import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launch", "train.py")


def sft_run(sft_folder, out, *extra, steps=10, data=None):
    data, model = data or sft_folder[0], sft_folder[1]
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
    main(sft_run(sft_folder, skipping, "--lr", "1e8", "--checkpoint-every", "2", "--keep-checkpoints", "3",
                 "--skip-nonfinite", steps=5))
    metrics = json.loads((skipping / "metrics.json").read_text())
    assert metrics["skipped_steps"] == [3, 4, 5] and metrics["losses"][2:] == [None, None, None]
    after = ckpt.read_checkpoint(ckpt.latest_checkpoint(str(skipping)))[1]  # step 5: nothing changed since 2
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


def adapter_of(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def test_resume_checks_what_it_resumes_and_never_goes_back(sft_folder, tmp_path):
    run = tmp_path / "run"
    main(sft_run(sft_folder, run, "--checkpoint-every", "3", steps=6))
    finished = json.loads((run / "metrics.json").read_text())
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step-000003", "step-000006"]  # the last step too

    # what sets the data order or the objective: refused, every difference listed
    other = tmp_path / "other.jsonl"
    other.write_text("".join(reversed(open(sft_folder[0]).readlines())))  # the same records, another order
    with pytest.raises(ValueError, match=r"differs in what sets the data order.*data_fingerprint: .*global_batch_size: 8 "
                                         r"there, 4 here.*seed: 0 there, 1 here.*--resume-changes ok"):
        main(sft_run(sft_folder, run, "--resume", "--seed", "1", "--global-batch-size", "4", steps=8, data=str(other)))
    with pytest.raises(ValueError, match=r"at step 6, past steps=4; a resume never goes back.*--steps 6 or more"):
        main(sft_run(sft_folder, run, "--resume", steps=4))
    assert adapter_of(run).keys() and json.loads((run / "metrics.json").read_text()) == finished  # untouched

    # the finished run resumed: nothing to train, the same adapter, the whole run's losses
    before = adapter_of(run)
    main(sft_run(sft_folder, run, "--resume", steps=6))
    assert all(torch.equal(before[key], value) for key, value in adapter_of(run).items())
    again = json.loads((run / "metrics.json").read_text())
    assert again["losses"] == finished["losses"] and again["resumed_at"] == [6]
    assert again["exact_match_before"] == finished["exact_match_before"]

    # lr and steps may change: named in the log; the metrics hold all 8 steps
    main(sft_run(sft_folder, run, "--resume", "--lr", "1e-3", steps=8))
    longer = json.loads((run / "metrics.json").read_text())
    assert len(longer["losses"]) == 8 and longer["losses"][:6] == finished["losses"] and longer["resumed_at"] == [6]

    # a fresh run into the used folder is refused; --overwrite clears the earlier run first
    with pytest.raises(ValueError, match=r"holds an earlier run's checkpoints, adapter, metrics.json.*--overwrite"):
        main(sft_run(sft_folder, run, steps=2))
    main(sft_run(sft_folder, run, "--overwrite", "--checkpoint-every", "1", steps=2))
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step-000001", "step-000002"]


def test_a_damaged_checkpoint_is_named_and_the_one_before_it_resumes(sft_folder, tmp_path, capsys):
    straight = tmp_path / "straight"
    main(sft_run(sft_folder, straight, "--checkpoint-every", "2", "--keep-checkpoints", "3", steps=6))
    damaged = tmp_path / "damaged"
    main(sft_run(sft_folder, damaged, "--checkpoint-every", "2", "--keep-checkpoints", "3", steps=6))
    optimizer = damaged / "checkpoints" / "step-000006" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # torn
    with pytest.raises(ValueError, match=r"step-000006/optimizer.safetensors cannot be read"):
        ckpt.read_checkpoint(str(damaged / "checkpoints" / "step-000006"))
    capsys.readouterr()
    main(sft_run(sft_folder, damaged, "--resume", "--checkpoint-every", "2", "--keep-checkpoints", "3", steps=6))
    said = capsys.readouterr().out
    assert "checkpoint step-000006 is damaged" in said and "optimizer.safetensors" in said
    assert "resuming from" in said and "step-000004 at step 4" in said
    reference, resumed = adapter_of(straight), adapter_of(damaged)
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)  # steps 5-6 again, bit for bit


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_the_resume_continues_exactly(sft_folder, tmp_path):
    """What a scheduler does before preemption: SIGTERM mid-training. The step in progress finishes,
    a checkpoint is written at it, the process exits 75 saying so; --resume then reaches the
    uninterrupted run's adapter bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the stopped process (OMP_NUM_THREADS=1): the same float32 sums, bit for bit
    try:
        _preempt_and_resume(sft_folder, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _preempt_and_resume(sft_folder, tmp_path):
    straight = tmp_path / "straight"
    main(sft_run(sft_folder, straight, "--checkpoint-every", "0", steps=120))
    stopped = tmp_path / "stopped"
    process = subprocess.Popen([sys.executable, TRAIN, *sft_run(sft_folder, stopped, "--checkpoint-every", "0", steps=120)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    while not (stopped / "init" / "gora.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT, (out + err)[-3000:]
    step = int(re.search(r"stopped by SIGTERM after step (\d+); checkpoint .*step-0*\1 written", err).group(1))
    assert 0 < step < 120 and "Traceback" not in err
    assert not (stopped / "adapter").exists()
    main(sft_run(sft_folder, stopped, "--resume", "--checkpoint-every", "0", steps=120))
    reference, resumed = adapter_of(straight), adapter_of(stopped)
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)
    metrics = json.loads((stopped / "metrics.json").read_text())
    assert metrics["resumed_at"] == [step] and len(metrics["losses"]) == 120


def test_the_command_answers_people(tmp_path):
    """--help lists every option with its docstring; a user error is one message and exit 2."""
    shown = subprocess.run([sys.executable, TRAIN, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "--max-grad-norm [1.0]" in shown.stdout and "--gora.rank_max" in shown.stdout
    assert "Clip the global gradient norm" in shown.stdout
    wrong = subprocess.run([sys.executable, TRAIN, "--stepz", "3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "error: unknown option 'stepz'; did you mean 'steps'?" in wrong.stderr


def worker_of_rank(launcher_pid: int, rank: int, deadline: float) -> int:
    """The pid of torchrun's worker process with RANK=rank (found through /proc)."""
    while time.monotonic() < deadline:
        for task in os.listdir(f"/proc/{launcher_pid}/task"):
            for child in open(f"/proc/{launcher_pid}/task/{task}/children").read().split():
                try:
                    environ = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in environ:
                    return int(child)
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank}")


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(sft_folder, tmp_path):
    """Two ranks under torchrun; SIGUSR1 reaches rank 1 only. Rank 0 learns of it through the step's
    loss all-reduce: both finish that step, one checkpoint is written at it, both exit 75 (torchrun
    then reports its workers' failure), nothing hangs."""
    import shutil

    out = tmp_path / "two"
    process = subprocess.Popen([shutil.which("torchrun"), "--standalone", "--nproc_per_node", "2", TRAIN,
                                *sft_run(sft_folder, out, "--engine", "ddp", "--checkpoint-every", "0", steps=400)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    rank_one = worker_of_rank(process.pid, 1, deadline)
    while not (out / "init" / "gora.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)
    os.kill(rank_one, signal.SIGUSR1)
    out_text, err = process.communicate(timeout=120)
    assert process.returncode != 0 and "exitcode  : 75" in err, (out_text + err)[-3000:]
    step = int(re.search(r"stopped by a stop signal on another rank after step (\d+)", err).group(1))
    assert 0 < step < 400 and sorted(os.listdir(out / "checkpoints")) == ["latest", f"step-{step:06d}"]
    assert ckpt.read_checkpoint(ckpt.latest_checkpoint(str(out)))[3]["world_size"] == 2


def test_config_files_that_do_not_parse_are_named_by_line(tmp_path):
    broken = tmp_path / "run.yaml"
    broken.write_text("steps: 10\nlr: [1e-3\nseed: 1\n")
    with pytest.raises(ValueError, match=rf"config file {broken}, line \d+ column \d+: invalid YAML"):
        load_config([str(broken)])
    broken_json = tmp_path / "run.json"
    broken_json.write_text('{"steps": 10,\n "lr": }\n')
    with pytest.raises(ValueError, match=rf"config file {broken_json}, line 2 column 8: invalid JSON"):
        load_config([str(broken_json)])


def test_result_files_are_replaced_whole_or_not_at_all(tmp_path):
    from gora_dist.launcher.files import write_atomically, write_json

    path = tmp_path / "metrics.json"
    write_json(str(path), {"losses": [1.0, 0.5]})

    def full_disk(stream):
        stream.write('{"losses": [')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(str(path), full_disk)
    assert json.loads(path.read_text()) == {"losses": [1.0, 0.5]} and os.listdir(tmp_path) == ["metrics.json"]


def test_zero3_skips_the_same_nonfinite_steps_as_one_process(sft_folder, tmp_path):
    """DeepSpeed's own step skips an update whose norm is not finite; the launcher counts the step in
    the schedule as torch's engines do, so ZeRO-3 at world 2 logs what one process logs."""
    pytest.importorskip("deepspeed")
    import shutil

    args = ("--lr", "1e8", "--skip-nonfinite", "--checkpoint-every", "2", "--keep-checkpoints", "3")
    main(sft_run(sft_folder, tmp_path / "one", *args, steps=5))
    command = [shutil.which("deepspeed"), "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 1000 + 7),
               TRAIN, *sft_run(sft_folder, tmp_path / "zero3", "--engine", "zero3", *args, steps=5)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    one, zero3 = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "zero3"))
    assert zero3["skipped_steps"] == one["skipped_steps"] == [3, 4, 5]
    assert zero3["losses"][:2] == pytest.approx(one["losses"][:2], rel=1e-5)
    read = lambda run, step: ckpt.read_checkpoint(str(tmp_path / run / "checkpoints" / f"step-{step:06d}"))[1]  # noqa: E731
    two, four, alone = read("zero3", 2), read("zero3", 4), read("one", 2)
    for name in two:  # the skipped steps changed nothing; step 2 is one process's (lr 1e8 magnifies rounding)
        assert all(torch.equal(two[name][i], four[name][i]) for i in (0, 1)), name
        assert torch.linalg.norm(two[name][1] - alone[name][1]) / torch.linalg.norm(alone[name][1]) < 1e-3, name
