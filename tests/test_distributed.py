"""Multi-process GoRA on the CPU (gloo): DDP, FSDP2 and DeepSpeed ZeRO-3 give the single-process
plan for the same global batches, hold 1/world of the gradients, train, and fail together and
clearly when one rank raises, disagrees or dies. Each case is one torchrun of tests/dist/worker.py."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import lm_batches, load_quantized, save_quantizable_llama, tiny_llama
from gora_dist import apply_gora, gora_modules
from gora_dist.method.comm_model import gora_collective_bytes

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from worker import CONFIG, GLOBAL_BATCH, GRAD_STEPS  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "dist", "worker.py")
TORCHRUN = shutil.which("torchrun") or "torchrun"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def launch(engine, world, out_dir, mode="ok", timeout=240, gora_timeout=60, config=None):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GORA_TIMEOUT=str(gora_timeout),
               GORA_CONFIG=json.dumps(config or {}))
    command = [TORCHRUN, "--standalone", "--nproc_per_node", str(world), WORKER, engine, str(out_dir), mode]
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - started


@pytest.fixture(scope="module")
def reference():
    """The single-process plan for the same global batches."""
    model = tiny_llama(intermediate_size=75)
    report = apply_gora(model, lm_batches(GRAD_STEPS, batch_size=GLOBAL_BATCH), CONFIG)
    adapters = {name: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for name, m in gora_modules(model)}
    return report, adapters


# FSDP2 at 4 ranks: tests/test_multinode.py's four-node run (init equal to one process's)
@pytest.mark.parametrize("engine, world", [("ddp", 2), ("fsdp2", 2), ("zero3", 2), ("zero3", 4)])
def test_sharded_plan_equals_single_process_and_trains(engine, world, tmp_path, reference):
    if engine == "zero3":
        pytest.importorskip("deepspeed")
    if engine in ("ddp", "fsdp2") and importlib.util.find_spec("bitsandbytes") is not None:  # a 4-bit base, same spawn
        save_quantizable_llama(str(tmp_path / "quantized_model"))
    result, _ = launch(engine, world, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    report, adapters = reference
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]

    # the same rank map on every rank, equal to one process's
    for fact in facts:
        assert fact["rank_map"] == report.rank_map
    # the same A0 (bit for bit) and B0 (up to float32 summation order across ranks)
    tensors = load_file(tmp_path / "plan" / "adapter_model.safetensors")
    for name, (lora_a, lora_b) in adapters.items():
        got_a = tensors[f"base_model.model.{name}.lora_A.weight"]
        got_b = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert torch.equal(got_a, lora_a), name
        assert torch.linalg.norm(got_b - lora_b) / torch.linalg.norm(lora_b) < 1e-5, name
    gora = json.loads((tmp_path / "plan" / "gora.json").read_text())
    for name, layer in report.layers.items():
        assert gora["layers"][name]["importance"] == pytest.approx(layer.importance, rel=1e-5)
        assert gora["layers"][name]["projection_error"] == pytest.approx(layer.projection_error, abs=1e-4)

    # the bytes GoRA's own collectives moved are exactly what the communication model predicts
    shapes = {name: layer.shape for name, layer in report.layers.items()}
    predicted = gora_collective_bytes(shapes, report.rank_map, world_size=world, steps=report.grad_steps)
    assert [fact["bytes"] for fact in facts] == [predicted] * world

    # gradient memory: each rank's float32 sums cover its shard only
    target = facts[0]["target_elements"]
    held = [fact["held_elements"] for fact in facts]
    assert sum(held) == target  # the shards tile the weights exactly once (DDP too: each rank sums a slice)
    assert max(held) <= math.ceil(target / world) + 48 * len(report.layers)  # at most a row per layer over 1/world

    assert all(fact["flags_restored"] for fact in facts)  # requires_grad as before estimation, FSDP2 too
    # the estimation engine is gone once the plan is made (ZeRO-3: no hook or buffer of it left) ...
    assert all(fact["engine_freed"] for fact in facts)
    if engine == "fsdp2":  # ... and FSDP2 freed each unsharded weight as it sharded it (nothing of ours held one)
        assert all(fact["unsharded_weights_freed"] for fact in facts)
        # every target's gradient went through our in-backward reduce-scatter: none waited as a shard
        assert "reduced this layer's gradient itself" not in result.stderr, result.stderr[-3000:]

    # a few training steps under the same engine: loss goes down, base weights stay
    for fact in facts:
        assert fact["losses"][-1] < fact["losses"][0] - 0.1, fact["losses"]
        assert fact["base_unchanged"]
    if engine != "zero3":  # replicated adapters (DDP; FSDP2's, outside its shards) stay equal on every rank
        assert len({fact["adapter_checksum"] for fact in facts}) == 1, [fact["adapter_checksum"] for fact in facts]
    if (tmp_path / "quantized_model").is_dir():
        assert_quantized_plan_equals_one_process(tmp_path, facts)
    if engine == "fsdp2":  # to_peft on a fresh sharded model trains exactly like GoRA's layers
        for fact in facts:
            assert fact["peft_losses"] == pytest.approx(fact["losses"], rel=1e-5, abs=1e-6), (fact["peft_losses"], fact["losses"])
            assert fact["peft_base_unchanged"]
        assert [fact["peft_checksum"] for fact in facts] == pytest.approx([facts[0]["adapter_checksum"]] * world, rel=1e-5)


def assert_quantized_plan_equals_one_process(out_dir, facts):
    """A 4-bit base (nf4 packed in bf16, QLoRA's FSDP setting) whole on each rank under DDP, its packed
    bytes sharded under FSDP2: each rank's gᵀx reduce-scattered to the owner of its partition (DDP) or
    rows (FSDP2) gives one process's plan of the same model, and the sums tile the targets once."""
    from gora_dist.pipeline.sharded import estimate_plan

    one = estimate_plan(load_quantized(str(out_dir / "quantized_model"), storage=torch.bfloat16),
                        lm_batches(GRAD_STEPS, batch_size=GLOBAL_BATCH), CONFIG, engine="local")
    assert all(fact["quantized_rank_map"] == one.rank_map for fact in facts)
    tensors = load_file(out_dir / "quantized_plan" / "adapter_model.safetensors")
    for name, lora_b in one.lora_b.items():
        assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], one.lora_a[name]), name
        got = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert torch.linalg.norm(got - lora_b) / torch.linalg.norm(lora_b) < 1e-5, name
    assert sum(fact["quantized_held_elements"] for fact in facts) == one.report.accumulator_elements


def test_nuclear_norm_importance_and_adaptive_steps_match_one_process(tmp_path):
    """The ablation metric gathers one layer at a time; adaptive N all-reduces partial sums per step."""
    overrides = {"importance": "wg_nuclear", "adaptive_grad_steps": True, "adaptive_min_steps": 2,
                 "adaptive_threshold": 10.0}
    result, _ = launch("zero3", 2, tmp_path, config=overrides)
    assert result.returncode == 0, result.stderr[-4000:]
    single = tiny_llama(intermediate_size=75)
    config = CONFIG.__class__(**{**CONFIG.to_dict(), **overrides})
    report = apply_gora(single, lm_batches(GRAD_STEPS, batch_size=GLOBAL_BATCH), config)
    gora = json.loads((tmp_path / "plan" / "gora.json").read_text())
    assert gora["grad_steps"] == report.grad_steps == 2  # stopped early, on every rank alike
    assert gora["rank_map"] == report.rank_map
    for name, layer in report.layers.items():
        assert gora["layers"][name]["importance"] == pytest.approx(layer.importance, rel=1e-5)
    shapes = {name: layer.shape for name, layer in report.layers.items()}
    predicted = gora_collective_bytes(shapes, report.rank_map, world_size=2, steps=2, importance="wg_nuclear",
                                      adaptive_steps=True)
    assert gora["timings"]["bytes_communicated"] == predicted


def test_gelora_ranks_are_the_same_at_world_sizes_1_and_2(tmp_path):
    """GeLoRA's hidden-state sample is gathered from both ranks; every rank gets one process's rank map."""
    overrides = {"allocator": "gelora", "gelora_offset": 3}
    result, _ = launch("fsdp2", 2, tmp_path, config=overrides)
    assert result.returncode == 0, result.stderr[-4000:]
    single = tiny_llama(intermediate_size=75)
    report = apply_gora(single, lm_batches(GRAD_STEPS, batch_size=GLOBAL_BATCH), CONFIG.__class__(**{**CONFIG.to_dict(), **overrides}))
    gora = json.loads((tmp_path / "plan" / "gora.json").read_text())
    assert gora["rank_map"] == report.rank_map
    assert gora["intrinsic_dimensions"] == pytest.approx(report.intrinsic_dimensions, rel=1e-4)
    shapes = {name: layer.shape for name, layer in report.layers.items()}
    levels = len(report.intrinsic_dimensions)
    predicted = gora_collective_bytes(shapes, report.rank_map, world_size=2, steps=report.grad_steps,
                                      gelora_points=(levels, GRAD_STEPS * GLOBAL_BATCH, 48))
    assert gora["timings"]["bytes_communicated"] == predicted


def test_a_rank_that_raises_fails_every_rank_clearly(tmp_path):
    result, seconds = launch("fsdp2", 2, tmp_path, mode="raise")
    assert result.returncode != 0
    assert "GoRADistributedError: gradient step 2 (loss): rank 1: gradient step 2: the model returned no loss" in result.stderr
    assert result.stderr.count("GoRADistributedError: gradient step 2") >= 2  # rank 0 raised too
    assert seconds < 120


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_a_rank_whose_data_ends_early_fails_every_rank_clearly(tmp_path, engine):
    result, seconds = launch(engine, 2, tmp_path, mode="short")
    assert result.returncode != 0
    expected = "GoRADistributedError: gradient step 2 (batch): rank 1: the batches ran out after 1 of grad_steps=3"
    assert result.stderr.count(expected) >= 2, result.stderr[-3000:]  # both ranks, before any forward
    assert seconds < 60


def test_disagreeing_rank_maps_are_an_error_not_a_divergence(tmp_path):
    result, _ = launch("ddp", 2, tmp_path, mode="disagree")
    assert result.returncode != 0
    assert "GoRADistributedError: rank map agreement: rank 1: own rank map differs from rank 0's" in result.stderr
    assert not (tmp_path / "plan").exists()


def test_a_rank_that_dies_does_not_hang_the_others(tmp_path):
    result, seconds = launch("ddp", 2, tmp_path, mode="die")
    assert result.returncode != 0
    assert "exitcode  : -9" in result.stderr or "Signals.SIGKILL" in result.stderr or "SIGKILL" in result.stderr
    assert seconds < 120
    assert not (tmp_path / "plan").exists()


def test_a_rank_that_vanishes_fails_the_others_clearly(tmp_path):
    """Rank 1 exits with status 0 (torchrun does not stop rank 0): its closed sockets fail rank 0's
    next GoRA collective at once, reported as a lost connection, not as a timeout. (A silent peer,
    which only the timeout catches, is the link cut in tests/test_multinode.py.)"""
    result, seconds = launch("ddp", 2, tmp_path, mode="vanish", gora_timeout=30)
    assert result.returncode != 0
    assert "GoRADistributedError: rank 0: gradient step 2 (loss): lost the connection to another rank after" in result.stderr
    assert seconds < 30  # well under the 30 s timeout
