"""Grouped projections (``grouped_lora_linear``: q/k/v sharing one x) against the torch reference, their
errors, and ``grouped_forward`` over GoRALinear modules (hooks honoured; on the GPU, against the torch path).

CPU cases (``interpreted``) run only under Triton's interpreter: in a normal session they skip and
``test_interpreter_suite`` (tests/test_kernel_dispatch.py) runs them, with the other kernel files', in one
child pytest with TRITON_INTERPRET=1; to run them directly: ``TRITON_INTERPRET=1 python -m pytest FILE -k "not gpu"``.
GPU cases (names contain ``gpu``) run in-process when CUDA is there. Everything skips without triton.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' brings it)")

from gora_dist.kernels import grouped_lora_linear, grouped_lora_linear_reference
from kernel_cases import (
    ADAPTER_TOLERANCE,
    GPU_BOUNDS,
    LAYER_TOLERANCES,
    _adapter_modules,
    _assert_matches,
    _relative_error,
    gpu,
    interpreted,
)
from kernel_cases import _kernels_asked_for  # noqa: F401  (autouse: the tests here ask for the kernels)


def _qkv(dtype, ranks=(7, 3, 13), outs=(48, 24, 24), bias=True, device="cpu"):
    gen = torch.Generator().manual_seed(3)
    in_features = 48

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    x = randn(2, 9, in_features).to(dtype).requires_grad_()
    weights = [randn(n, in_features, scale=in_features ** -0.5).to(dtype) for n in outs]
    biases = [randn(n, scale=0.5).to(dtype) if bias and i != 1 else None for i, n in enumerate(outs)]
    lora_as = [randn(r, in_features, scale=in_features ** -0.5).requires_grad_() for r in ranks]
    lora_bs = [randn(n, r, scale=0.3).requires_grad_() for n, r in zip(outs, ranks)]
    scalings = [16 / math.sqrt(r) for r in ranks]
    grad_outs = [randn(2, 9, n).to(dtype) for n in outs]
    return x, weights, biases, lora_as, lora_bs, scalings, grad_outs


@interpreted
@pytest.mark.parametrize("used", [3, 2])  # 2: v's output does not reach the loss
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("dtype", "atol", "rtol"), LAYER_TOLERANCES[:2])
def test_grouped_qkv_matches_reference(dtype, atol, rtol, bias, used):
    x, weights, biases, lora_as, lora_bs, scalings, grad_outs = _qkv(dtype, bias=bias)
    results = []
    for fn in (grouped_lora_linear, grouped_lora_linear_reference):
        ys = fn(x, weights, biases, lora_as, lora_bs, scalings)
        loss = sum((y * g).sum() for y, g in zip(ys[:used], grad_outs)).float()
        results.append((ys, torch.autograd.grad(loss, [x, *lora_as, *lora_bs], allow_unused=True)))
    (ys, grads), (ys_ref, grads_ref) = results
    for i, (y, y_ref) in enumerate(zip(ys, ys_ref)):
        _assert_matches(y, y_ref, atol, rtol, f"y[{i}]")
    _assert_matches(grads[0], grads_ref[0], atol, rtol, "dX")
    names = [f"dA[{i}]" for i in range(3)] + [f"dB[{i}]" for i in range(3)]
    for name, g, w in zip(names, grads[1:], grads_ref[1:]):
        if w is None:  # unused projection: no gradient, or an all-zero one
            assert g is None or float(g.abs().max()) == 0.0, name
        else:
            _assert_matches(g, w, what=name, **ADAPTER_TOLERANCE)


@interpreted
def test_grouped_errors_name_the_projection():
    x, weights, biases, lora_as, lora_bs, scalings, _ = _qkv(torch.float32)
    lora_bs[2] = torch.zeros(24, 5)
    with pytest.raises(ValueError, match=r"grouped_lora_linear\[2\].*lora_b"):
        grouped_lora_linear(x, weights, biases, lora_as, lora_bs, scalings)
    with pytest.raises(ValueError, match="scalings"):
        grouped_lora_linear(x, weights, biases, lora_as, lora_bs, scalings[:2])


@interpreted
def test_grouped_forward_honours_hooks_on_the_adapter_modules():
    from gora_dist.model.layers import grouped_forward

    modules = _adapter_modules()
    x = torch.randn(4, 16)
    plain = [m(x) for m in modules]
    seen = []
    modules[1].register_forward_pre_hook(lambda mod, args: seen.append("pre"))
    modules[0].register_forward_hook(lambda mod, args, out: out * 0)
    ys = grouped_forward(modules, x)
    assert seen == ["pre"] and int(torch.count_nonzero(ys[0])) == 0
    torch.testing.assert_close(ys[1], plain[1])
    for module in modules:
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    modules[0].forward = lambda inputs: torch.zeros(4, 8)  # an instance-level forward also counts
    assert int(torch.count_nonzero(grouped_forward(modules, x)[0])) == 0


@gpu
@pytest.mark.parametrize(("dtype", "bound"), GPU_BOUNDS[:2])
def test_gpu_grouped_and_goralinear(dtype, bound):
    from gora_dist.model.layers import GoRALinear, grouped_forward

    x, weights, biases, lora_as, lora_bs, _, grad_outs = _qkv(dtype, ranks=(16, 5, 27), outs=(512, 128, 128),
                                                              device="cuda")
    modules = []
    for weight, bias, lora_a, lora_b in zip(weights, biases, lora_as, lora_bs):
        base = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="cuda", dtype=dtype)
        with torch.no_grad():
            base.weight.copy_(weight)
            if bias is not None:
                base.bias.copy_(bias)
        module = GoRALinear(base, lora_a.shape[0], alpha=16.0)
        with torch.no_grad():
            module.lora_A.copy_(lora_a)
            module.lora_B.copy_(lora_b)
        modules.append(module)
    assert all(m.kernel_applies(x) for m in modules)
    params = [x] + [p for m in modules for p in (m.lora_A, m.lora_B)]

    def outputs_and_grads(ys):
        loss = sum((y.float() * g.float()).sum() for y, g in zip(ys, grad_outs))
        return ys, torch.autograd.grad(loss, params)

    runs = [outputs_and_grads(grouped_forward(modules, x)), outputs_and_grads([m(x) for m in modules])]
    for m in modules:
        m.use_kernel = False
    assert not any(m.kernel_applies(x) for m in modules)
    plain = outputs_and_grads([m(x) for m in modules])
    for ys, grads in runs:  # grouped kernel, per-module kernel
        for y, y_ref in zip(ys, plain[0]):
            assert _relative_error(y, y_ref) < bound
        for g, g_ref in zip(grads, plain[1]):
            assert _relative_error(g, g_ref) < bound
