"""Shared pieces of the kernel tests (tests/test_kernel_*.py): the ``interpreted`` and ``gpu`` marks,
tolerance tables, the layer builders and error measures, and the autouse fixture that asks for the kernels
(a test file applies it by importing it).

``INTERPRETED`` is read when this is first imported: the interpreter child of ``test_interpreter_suite``
(tests/test_kernel_dispatch.py) has TRITON_INTERPRET=1 set before. Importing this imports no triton.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available() and not INTERPRETED
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child of test_interpreter_suite")
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# Layer dtype, then (atol, rtol) for y and dX. The kernel rounds y once from float32; the reference rounds
# the base output and then the sum, so they differ by about one unit in the last place of O(1) outputs.
LAYER_TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),  # same float32 math, only the summation order differs
    (torch.float16, 4e-3, 4e-3),  # fp16 ulp is 2^-10 relative: one or two ulps of |y| <= 4
    (torch.bfloat16, 3e-2, 2e-2),  # bf16 ulp is 2^-7 relative, and the interpreter's bf16 store truncates
]
# dA and dB are float32 adapter gradients computed in float32 on both sides (exact float32 dots under
# the interpreter): only the order of summation differs.
ADAPTER_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}

# GPU: bf16 and realistic sizes. TF32 rank-r products for 16-bit layers, cuBLAS in the reference:
# compare by relative Frobenius error; each bound has its reason.
GPU_BOUNDS = [
    (torch.bfloat16, 8e-3),  # bf16 output rounding (2^-9 relative per element, averaged) + TF32 adapter dots
    (torch.float16, 2e-3),  # fp16 output rounding (2^-11) + TF32 adapter dots
    (torch.float32, 1e-5),  # exact float32 ("ieee") everywhere, only the order differs
]


@pytest.fixture(autouse=True)
def _kernels_asked_for(monkeypatch):
    """On CUDA the kernels run only with GORA_KERNELS=1 (torch is the default there): the GPU cases
    here test the kernels, so they ask for them (the interpreter runs them regardless)."""
    monkeypatch.setenv("GORA_KERNELS", "1")


def _layer(dtype, rank, *, in_features=45, out_features=37, bias=True, tokens=(3, 13), seed=0, device="cpu"):
    """Odd sizes (45 in, 37 out, 39 tokens: partial tiles everywhere) scaled so that |y| stays O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    x = randn(*tokens, in_features).to(dtype).requires_grad_()
    weight = randn(out_features, in_features, scale=in_features ** -0.5).to(dtype)
    bias_ = randn(out_features, scale=0.5).to(dtype) if bias else None
    lora_a = randn(rank, in_features, scale=in_features ** -0.5).requires_grad_()
    lora_b = randn(out_features, rank, scale=0.3).requires_grad_()
    grad_out = randn(*tokens, out_features).to(dtype)
    return x, weight, bias_, lora_a, lora_b, grad_out


def _outputs_and_grads(fn, x, weight, bias, lora_a, lora_b, scaling, grad_out):
    y = fn(x, weight, bias, lora_a, lora_b, scaling)
    grads = torch.autograd.grad(y, (x, lora_a, lora_b), grad_out)
    return (y, *grads)


def _assert_matches(got, want, atol, rtol, what):
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _relative_error(got, want):
    return float(torch.linalg.norm(got.detach().double() - want.detach().double()) / torch.linalg.norm(want.detach().double()).clamp_min(1e-30))


def _adapter_modules(shapes=((8, 3), (4, 5)), in_features=16):
    from gora_dist.model.layers import GoRALinear

    torch.manual_seed(0)
    modules = []
    for out_features, rank in shapes:
        module = GoRALinear(torch.nn.Linear(in_features, out_features), rank, alpha=4.0).eval()
        with torch.no_grad():
            module.lora_A.normal_(0, in_features ** -0.5)
            module.lora_B.normal_(0, 0.3)
        modules.append(module)
    return modules


def _gradient_and_a(rows=37, cols=50, rank=13, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bound = cols ** -0.5
    return torch.randn(rows, cols, generator=gen), (torch.rand(rank, cols, generator=gen) * 2 - 1) * bound
