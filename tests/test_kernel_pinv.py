"""The pseudo-inverse init: the projected gradient C = G·Aᵀ and B0 against the float64 reference (ranks
above the in-kernel solve, row shards, several layers at once), plan's projection hook on flat shards.

CPU cases (``interpreted``) run only under Triton's interpreter: in a normal session they skip and
``test_interpreter_suite`` (tests/test_kernel_dispatch.py) runs them, with the other kernel files', in one
child pytest with TRITON_INTERPRET=1; to run them directly: ``TRITON_INTERPRET=1 python -m pytest FILE -k "not gpu"``.
GPU cases (names contain ``gpu``) run in-process when CUDA is there. Everything skips without triton.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' brings it)")

from gora_dist.kernels import pinv_init_b_reference, projected_gradient_reference
from kernel_cases import _gradient_and_a, _relative_error, gpu, interpreted
from kernel_cases import _kernels_asked_for  # noqa: F401  (autouse: the tests here ask for the kernels)


@interpreted
@pytest.mark.parametrize("rank", [1, 7, 32])
def test_projected_gradient_and_b0_match_reference(rank):
    from gora_dist.kernels.pinv_solve import (
        pinv_init_b_triton,
        projected_gradient_triton,
    )

    grad, lora_a = _gradient_and_a(rank=rank)
    c_ref = projected_gradient_reference(grad, lora_a)
    torch.testing.assert_close(projected_gradient_triton(grad, lora_a), c_ref, atol=1e-5, rtol=1e-5)
    b0_ref = pinv_init_b_reference(grad, lora_a, 0.3)  # solved in float64
    b0 = pinv_init_b_triton(grad, lora_a, 0.3)
    # float32 K⁻¹ of a well-conditioned Gram (cond ≈ 1 for Kaiming A0 with r ≪ in): float32-level error
    torch.testing.assert_close(b0, b0_ref, atol=1e-5 * float(b0_ref.abs().max()), rtol=1e-4)
    b0_bf16 = pinv_init_b_triton(grad, lora_a, 0.3, dtype=torch.bfloat16)
    assert b0_bf16.dtype == torch.bfloat16
    # one bf16 rounding; the interpreter's float32 -> bf16 store truncates (GPUs round to nearest): 2^-7
    torch.testing.assert_close(b0_bf16.float(), b0_ref, atol=0, rtol=2 ** -7)


@interpreted
def test_b0_above_the_in_kernel_solve_rank():
    """Ranks in (MAX_SOLVE_RANK, MAX_RANK]: the kernel writes C and the solve runs in torch (the K⁻¹ tile
    would not fit an H100's shared memory); same B0 as the float64 reference."""
    from gora_dist.kernels.pinv_solve import MAX_SOLVE_RANK, launch_config, pinv_init_b_triton

    rank = MAX_SOLVE_RANK + 3
    assert not launch_config(rank, True)["HAS_SOLVE"] and launch_config(MAX_SOLVE_RANK, True)["HAS_SOLVE"]
    grad, lora_a = _gradient_and_a(rows=21, cols=600, rank=rank)
    b0_ref = pinv_init_b_reference(grad, lora_a, 0.3)
    torch.testing.assert_close(pinv_init_b_triton(grad, lora_a, 0.3), b0_ref, atol=1e-5 * float(b0_ref.abs().max()), rtol=1e-4)
    b0_bf16 = pinv_init_b_triton(grad, lora_a, 0.3, dtype=torch.bfloat16)
    assert b0_bf16.dtype == torch.bfloat16
    # one bf16 rounding to nearest (torch's cast): 2^-9 relative, plus the float32 error near zero entries
    torch.testing.assert_close(b0_bf16.float(), b0_ref, atol=1e-5 * float(b0_ref.abs().max()), rtol=2 ** -8)


@interpreted
def test_b0_of_a_row_shard_is_the_same_rows_and_layers_run_together():
    from gora_dist.kernels.pinv_solve import pinv_init_b_layers, pinv_init_b_triton

    grad, lora_a = _gradient_and_a()
    full = pinv_init_b_triton(grad, lora_a, 0.7)
    torch.testing.assert_close(pinv_init_b_triton(grad[5:20], lora_a, 0.7), full[5:20], atol=1e-6, rtol=1e-5)  # tiles differ: summation order
    second_grad, second_a = _gradient_and_a(rows=20, cols=33, rank=3, seed=1)
    b0 = pinv_init_b_layers({"q": grad, "k": second_grad}, {"q": lora_a, "k": second_a}, {"q": 0.7, "k": 0.2})
    torch.testing.assert_close(b0["q"], full)
    torch.testing.assert_close(b0["k"], pinv_init_b_reference(second_grad, second_a, 0.2), atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="lora_a"):
        pinv_init_b_triton(grad, lora_a[:, :40], 0.7)


@interpreted
@pytest.mark.parametrize(("start", "stop"), [(0, 37 * 50), (75, 1234), (120, 140), (50, 37 * 50 - 7)])
def test_plan_projection_hook_matches_the_torch_shard_product(start, stop):
    """plan._add_projection with the kernel on ZeRO-3-style flat shards that cut rows at both ends."""
    from gora_dist.pipeline.plan import _add_projection
    from gora_dist.method.shards import FlatShard, add_shard_product

    grad, lora_a = _gradient_and_a()
    shard = FlatShard(start, stop, 37, 50)
    flat = grad.reshape(-1)[start:stop]
    got, want = torch.zeros(37, 13), torch.zeros(37, 13)
    _add_projection(got, flat, shard, lora_a, use_kernel=True)
    add_shard_product(want, flat, shard, lora_a)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@gpu
def test_gpu_pinv_init_of_a_4096_layer():
    from gora_dist.kernels.pinv_solve import pinv_init_b_triton

    grad, lora_a = _gradient_and_a(rows=4096, cols=4096, rank=32)
    grad = grad.cuda()
    b0 = pinv_init_b_triton(grad, lora_a, 0.3)
    assert _relative_error(b0, pinv_init_b_reference(grad, lora_a, 0.3)) < 1e-5  # float32 vs float64 solve
