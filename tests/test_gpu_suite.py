"""benchmarks/gpu_suite.py --dry-run: the GPU suite's every step runs on the CPU (Triton's interpreter,
tiny shapes), so the script a lent GPU's first minutes depend on cannot rot between GPU runs; and its
time limit cuts a step off while keeping what was measured before it."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.py")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e '.[test]' brings it)")


def _suite(tmp_path, *arguments, timeout=600):
    return subprocess.run([sys.executable, SUITE, "--dry-run", "--out", str(tmp_path), *arguments],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_dry_run_runs_every_step_and_the_kernel_path_matches_the_torch_path(tmp_path):
    result = _suite(tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / "gpu_dry_run.json").read_text())
    steps = record["steps"]
    assert list(steps) == ["environment", "gpu_tests", "kernels", "init_kernels_on", "init_kernels_off",
                           "sft_kernels_on", "sft_kernels_off", "trainer_fsdp2", "sharded_svd"]
    assert all(entry["status"] == "ok" for entry in steps.values()), {n: e["status"] for n, e in steps.items()}
    env = steps["environment"]["result"]
    assert env["packages"]["torch"] and env["copy_gbps"] > 0 and env["matmul_tflops"] > 0
    tests = steps["gpu_tests"]["result"]
    assert tests["ok"] and tests["counts"].get("skipped", 0) >= 10, tests  # no CUDA here: the GPU cases skip
    assert {row["impl"] for row in steps["kernels"]["result"]["layers"]} == {"base", "torch", "peft", "fused"}
    on, off = steps["init_kernels_on"]["result"], steps["init_kernels_off"]["result"]
    assert on["rank_map"] == off["rank_map"] and len(on["rank_map"]) == 14  # 2 blocks × 7 projections
    assert all(4 <= rank <= 32 for rank in on["rank_map"].values()) and len(set(on["rank_map"].values())) > 1
    assert on["adapter_parameters"] == off["adapter_parameters"] and on["after_over_gradient"] > 0
    # the same init and batches through the interpreted kernels and through the torch path: the same losses
    sft_on, sft_off = steps["sft_kernels_on"]["result"], steps["sft_kernels_off"]["result"]
    assert sft_on["finite"] and sft_off["finite"]
    assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(sft_on["losses"], sft_off["losses"])), (sft_on, sft_off)
    trainer = steps["trainer_fsdp2"]["result"]  # on the CPU with accelerate's device gate lifted (fsdp_on_cpu.py)
    assert trainer["ok"] and trainer["rank_map_equal"] and trainer["last_loss"] < trainer["first_loss"], trainer
    assert trainer["fsdp_plugin"] and trainer["sharded_weights"], trainer
    svd = steps["sharded_svd"]["result"]  # every distinct target shape at two ranks, each SVD within 5 %
    assert svd["ok"] and {tuple(row["shape"]) for row in svd["rows"]} == {(64, 64), (32, 64), (128, 64), (64, 128)}
    text = (tmp_path / "gpu_dry_run.md").read_text()
    assert "Sharded randomized SVD" in text
    assert text.startswith("# DRY RUN on the CPU, NOT A MEASUREMENT") and "| trainer_fsdp2 | ok |" in text


def test_budget_cuts_a_step_off_and_keeps_what_ran_before(tmp_path):
    # the environment step takes 2-4 s here, the interpreted kernel benchmark well over 10 s: it gets the
    # 5-7 s left and is cut off; nothing is left for the init step
    result = _suite(tmp_path, "--budget-s", "9", "--only", "environment,kernels,init_kernels_on", timeout=120)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    steps = json.loads((tmp_path / "gpu_dry_run.json").read_text())["steps"]
    assert steps["environment"]["status"] == "ok" and steps["environment"]["result"]["copy_gbps"] > 0
    assert steps["kernels"]["status"].startswith("timed out"), steps["kernels"]
    assert steps["init_kernels_on"]["status"].startswith("not run"), steps["init_kernels_on"]
    assert "kernels: timed out" in (tmp_path / "gpu_dry_run.md").read_text()
    # the cut-off step's own child (kernel_speed.py) went with it: nothing keeps running into the next step
    assert not [pid for pid, line in _command_lines() if "kernel_speed.py" in line and str(tmp_path) in line]


def _command_lines():
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                yield pid, handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
