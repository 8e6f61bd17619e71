"""Triton kernels against their torch references: outputs and every gradient, over (dtype, atol, rtol).

How the CPU cases run: Triton's interpreter must be switched on (``TRITON_INTERPRET=1``) before the
kernel modules are first imported, and setting it inside this pytest process would leak into every
other test module (collection imports them all first). So in a normal session the CPU cases are
skipped and ``test_interpreter_suite`` runs this file again in a child pytest with the variable set,
where they run (and the GPU cases skip). GPU cases (names contain ``gpu``) run in-process when CUDA
is there, without the interpreter. Everything skips, with the reason, when triton is not installed.
Shapes are small on purpose: the interpreter runs every program instance in numpy.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' brings it)")

from gora_dist.kernels import (
    grouped_lora_linear,
    grouped_lora_linear_reference,
    lora_linear,
    lora_linear_reference,
    pinv_init_b_reference,
    projected_gradient_reference,
    triton_can_run,
)

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
RANKS = [1, 3, 7, 13, 17, 32]


@pytest.fixture(autouse=True)
def _kernels_asked_for(monkeypatch):
    """On CUDA the kernels run only with GORA_KERNELS=1 (torch is the default there): the GPU cases
    here test the kernels, so they ask for them (the interpreter runs them regardless)."""
    monkeypatch.setenv("GORA_KERNELS", "1")


def test_the_kernels_run_on_cuda_only_when_asked_for(monkeypatch):
    from gora_dist.kernels import kernels_run_on

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert kernels_run_on(cuda) and kernels_run_on(cpu) == INTERPRETED
    monkeypatch.delenv("GORA_KERNELS")
    assert not kernels_run_on(cuda) and kernels_run_on(cpu) == INTERPRETED  # the default: torch on CUDA
    monkeypatch.setenv("GORA_KERNELS", "1")
    monkeypatch.setenv("GORA_DISABLE_KERNELS", "1")
    assert not kernels_run_on(cuda) and not kernels_run_on(cpu)


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


# --- the fused layer ----------------------------------------------------------------------------------

@interpreted
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), LAYER_TOLERANCES)
def test_lora_linear_matches_reference(dtype, atol, rtol, rank, bias):
    x, weight, bias_, lora_a, lora_b, grad_out = _layer(dtype, rank, bias=bias, seed=rank)
    scaling = 16 / math.sqrt(rank)
    got = _outputs_and_grads(lora_linear, x, weight, bias_, lora_a, lora_b, scaling, grad_out)
    want = _outputs_and_grads(lora_linear_reference, x, weight, bias_, lora_a, lora_b, scaling, grad_out)
    for name, g, w in zip(["y", "dX"], got[:2], want[:2]):
        _assert_matches(g, w, atol, rtol, name)
    for name, g, w in zip(["dA", "dB"], got[2:], want[2:]):
        _assert_matches(g, w, what=name, **ADAPTER_TOLERANCE)


@interpreted
def test_lora_linear_is_no_worse_than_the_reference_against_float64():
    """bf16: the kernel's single rounding is at least as close to the exact result as the reference."""
    x, weight, bias, lora_a, lora_b, _ = _layer(torch.bfloat16, 13)
    exact = lora_linear_reference(x.double(), weight.double(), bias.double(), lora_a.double(), lora_b.double(), 2.0)
    kernel_error = (lora_linear(x, weight, bias, lora_a, lora_b, 2.0).double() - exact).abs().max()
    reference_error = (lora_linear_reference(x, weight, bias, lora_a, lora_b, 2.0).double() - exact).abs().max()
    assert kernel_error <= reference_error * 1.01


@interpreted
def test_bf16_adapters_and_strided_input():
    """Adapters in bf16 (FSDP2 mixed precision casts them) and an x that is a transposed view.

    The reference runs the adapter in bf16 (S rounded, dA/dB summed by bf16 matmuls), the kernel in
    float32 with one bf16 rounding on store: both are compared with the float64 result, and the kernel
    must be within a bf16 rounding (2^-8 relative, Frobenius) and no worse than the reference."""
    x, weight, bias, lora_a, lora_b, grad_out = _layer(torch.float32, 7, tokens=(13, 3))
    x_t = x.detach().transpose(0, 1).requires_grad_()  # (3, 13, in), not contiguous
    grad_t = grad_out.transpose(0, 1)
    lora_a16 = lora_a.detach().bfloat16().requires_grad_()
    lora_b16 = lora_b.detach().bfloat16().requires_grad_()
    got = _outputs_and_grads(lora_linear, x_t, weight, bias, lora_a16, lora_b16, 1.5, grad_t)
    want = _outputs_and_grads(lora_linear_reference, x_t, weight, bias, lora_a16, lora_b16, 1.5, grad_t)
    exact_inputs = [t.detach().double().requires_grad_() for t in (x_t, lora_a16, lora_b16)]
    exact = _outputs_and_grads(lora_linear_reference, exact_inputs[0], weight.double(), bias.double(),
                               exact_inputs[1], exact_inputs[2], 1.5, grad_t.double())
    for name, g, w, e in zip(["y", "dX", "dA", "dB"], got, want, exact):
        assert g.dtype == w.dtype, (name, g.dtype, w.dtype)
        kernel_error, reference_error = _relative_error(g, e), _relative_error(w, e)
        assert kernel_error < 2 ** -8 and kernel_error <= reference_error * 1.01 + 1e-6, (name, kernel_error, reference_error)


@interpreted
def test_empty_batch_and_frozen_only_inputs():
    x, weight, bias, lora_a, lora_b, _ = _layer(torch.float32, 3, tokens=(0, 5))
    y = lora_linear(x, weight, bias, lora_a, lora_b, 1.0)
    assert y.shape == (0, 5, 37)
    y.sum().backward()
    assert x.grad.shape == x.shape and float(lora_a.grad.abs().sum()) == 0.0
    # no gradient wanted for x: only the adapters' backward runs
    x, weight, bias, lora_a, lora_b, grad_out = _layer(torch.float32, 3)
    x = x.detach()
    got = torch.autograd.grad(lora_linear(x, weight, bias, lora_a, lora_b, 1.0), (lora_a, lora_b), grad_out)
    want = torch.autograd.grad(lora_linear_reference(x, weight, bias, lora_a, lora_b, 1.0), (lora_a, lora_b), grad_out)
    for name, g, w in zip(["dA", "dB"], got, want):
        _assert_matches(g, w, what=name, **ADAPTER_TOLERANCE)


@interpreted
def test_trainable_base_and_disabled_kernels_fall_back_to_the_reference(monkeypatch):
    x, weight, bias, lora_a, lora_b, _ = _layer(torch.float32, 3)
    assert triton_can_run(x, weight)
    weight.requires_grad_()
    lora_linear(x, weight, bias, lora_a, lora_b, 1.0).sum().backward()
    assert weight.grad is not None  # only the reference path gives the base a gradient
    monkeypatch.setenv("GORA_DISABLE_KERNELS", "1")
    assert not triton_can_run(x, weight)


@interpreted
@pytest.mark.parametrize(("change", "culprit"), [
    ({"lora_b": torch.zeros(37, 4)}, "lora_b"),
    ({"lora_a": torch.zeros(3, 44)}, "lora_a"),
    ({"bias": torch.zeros(36)}, "bias"),
    ({"weight": torch.zeros(37, 45, dtype=torch.float16)}, "weight"),
    ({"lora_b": torch.zeros(37, 3, dtype=torch.float64)}, "lora_b"),
    ({"x": torch.zeros(2, 44)}, "x"),
])
def test_errors_name_the_tensor(change, culprit):
    x, weight, bias, lora_a, lora_b, _ = _layer(torch.float32, 3)
    args = {"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b, **change}
    from gora_dist.kernels.lora import lora_linear_triton

    with pytest.raises(ValueError, match=culprit):
        lora_linear_triton(scaling=1.0, **args)


@interpreted
def test_zero3_partitioned_weight_is_gathered_in_backward_and_repartitioned():
    """A stand-in for a DeepSpeed ZeRO-3 parameter: ds_id, ds_status, all_gather(), partition()."""
    x, weight, bias, lora_a, lora_b, grad_out = _layer(torch.float32, 7)
    full = weight.clone()
    calls = []

    def all_gather():
        calls.append("all_gather")
        weight.data = full.clone()
        weight.ds_status = SimpleNamespace(name="AVAILABLE")

    def partition():
        calls.append("partition")
        weight.data = torch.empty(0)
        weight.ds_status = SimpleNamespace(name="NOT_AVAILABLE")

    weight.ds_id, weight.all_gather, weight.partition = 0, all_gather, partition
    weight.ds_status = SimpleNamespace(name="AVAILABLE")  # gathered by the caller's hooks for forward
    y = lora_linear(x, weight, bias, lora_a, lora_b, 1.0)
    partition()  # ZeRO-3 releases it after forward
    calls.clear()
    grads = torch.autograd.grad(y, (x, lora_a, lora_b), grad_out)
    assert calls == ["all_gather", "partition"] and weight.numel() == 0
    want = _outputs_and_grads(lora_linear_reference, x, full, bias, lora_a, lora_b, 1.0, grad_out)
    _assert_matches(grads[0], want[1], 1e-5, 1e-5, "dX")


# --- grouped projections ---------------------------------------------------------------------------------

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
def test_goralinear_kernel_path_and_when_it_steps_aside(monkeypatch):
    """GoRALinear takes the kernel path (here on the CPU, under the interpreter) only when nothing is
    bypassed, and matches its torch path; grouped_forward matches the modules' own forwards."""
    from gora_dist.model.layers import GoRALinear, grouped_forward

    torch.manual_seed(0)
    modules = []
    for out_features, rank in ((40, 7), (24, 3), (24, 13)):
        module = GoRALinear(torch.nn.Linear(40, out_features), rank, alpha=16.0, dropout=0.1)
        with torch.no_grad():
            module.lora_A.normal_(0, 40 ** -0.5)
            module.lora_B.normal_(0, 0.3)
        modules.append(module.eval())
    x = torch.randn(2, 9, 40, requires_grad=True)
    params = [x] + [p for m in modules for p in (m.lora_A, m.lora_B)]

    def outputs_and_grads(ys):
        return ys, torch.autograd.grad(sum((y * y).sum() for y in ys), params)

    assert all(m.kernel_applies(x) for m in modules)
    fused = [outputs_and_grads(grouped_forward(modules, x)), outputs_and_grads([m(x) for m in modules])]
    for m in modules:
        m.use_kernel = False
    plain = outputs_and_grads([m(x) for m in modules])
    for ys, grads in fused:
        for got, want in zip([*ys, *grads], [*plain[0], *plain[1]]):
            torch.testing.assert_close(got, want, **ADAPTER_TOLERANCE)  # float32 throughout, order only

    module = modules[0]
    module.use_kernel = True
    assert module.kernel_applies(x)
    module.train()  # dropout 0.1 active: the adapter would see another x than the base
    assert not module.kernel_applies(x)
    module.eval()
    handle = module.base.register_forward_pre_hook(lambda mod, args: None)  # e.g. ZeRO-3's gathering hook
    assert not module.kernel_applies(x)
    handle.remove()
    module.base.weight.requires_grad_(True)
    assert not module.kernel_applies(x)
    module.base.weight.requires_grad_(False)
    assert not module.kernel_applies(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast on x's device, not only CUDA's
        assert not module.kernel_applies(x)
    assert module.kernel_applies(x)
    monkeypatch.setenv("GORA_DISABLE_KERNELS", "1")
    assert not module.kernel_applies(x)


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


@interpreted
def test_kernel_path_steps_aside_for_everything_calling_base_would_run():
    """Backward hooks on the base, global module hooks and an instance-level base.forward (accelerate's
    add_hook_to_module) all run only when base(x) is called: the kernel path must not take those layers."""
    from torch.nn.modules import module as module_hooks

    (module,) = _adapter_modules(shapes=((8, 3),))
    x = torch.randn(4, 16, requires_grad=True)
    assert module.kernel_applies(x)
    calls = []
    for register in (module.base.register_full_backward_hook, module.base.register_full_backward_pre_hook):
        handle = register(lambda *args: calls.append("backward"))
        assert not module.kernel_applies(x)
        module(x).sum().backward()
        assert calls == ["backward"], calls
        calls.clear()
        handle.remove()
    for register in (module_hooks.register_module_forward_hook, module_hooks.register_module_forward_pre_hook,
                     module_hooks.register_module_full_backward_hook,
                     module_hooks.register_module_full_backward_pre_hook):
        handle = register(lambda *args: None)
        try:
            assert not module.kernel_applies(x), register.__name__
        finally:
            handle.remove()
    assert module.kernel_applies(x)
    plain_forward = module.base.forward
    module.base.forward = lambda inputs: plain_forward(inputs) * 0  # as accelerate's hooks replace it
    assert not module.kernel_applies(x)
    y = module(x)
    adapter = (x @ module.lora_A.T) @ module.lora_B.T * module.scaling
    torch.testing.assert_close(y, adapter, atol=1e-6, rtol=1e-5)  # the base term is the replaced forward's 0
    del module.base.forward
    module.base._hf_hook = object()  # accelerate also marks the module
    assert not module.kernel_applies(x)
    del module.base._hf_hook
    assert module.kernel_applies(x)


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


@interpreted
def test_functional_entries_fall_back_for_float64_autocast_and_tensor_subclasses():
    x, weight, bias, lora_a, lora_b, _ = _layer(torch.float32, 3)
    doubles = [t.detach().double() for t in (x, weight, bias, lora_a, lora_b)]
    torch.testing.assert_close(lora_linear(*doubles, 1.5), lora_linear_reference(*doubles, 1.5))  # no ValueError
    ys = grouped_lora_linear(doubles[0], [doubles[1]], [doubles[2]], [doubles[3]], [doubles[4]], [1.5])
    torch.testing.assert_close(ys[0], lora_linear_reference(*doubles, 1.5))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the reference casts as autocast says; the kernel would not
        got, want = lora_linear(x, weight, bias, lora_a, lora_b, 1.5), lora_linear_reference(x, weight, bias, lora_a, lora_b, 1.5)
    assert got.dtype == want.dtype == torch.bfloat16

    class Marked(torch.Tensor):  # stands for DTensor, FakeTensor, quantised weights: own dispatch, no raw storage
        pass

    marked = weight.as_subclass(Marked)
    assert triton_can_run(x, weight) and not triton_can_run(x, marked)
    assert not triton_can_run(x, torch.nn.Parameter(marked, requires_grad=False))
    assert triton_can_run(x, torch.nn.Parameter(weight, requires_grad=False), None)


@interpreted
def test_double_backward_raises_instead_of_detaching():
    from gora_dist.model.layers import grouped_forward

    x, weight, bias, lora_a, lora_b, _ = _layer(torch.float32, 3)
    (grad_a,) = torch.autograd.grad(lora_linear(x, weight, bias, lora_a, lora_b, 1.0).square().sum(), lora_a,
                                    create_graph=True)
    assert grad_a.requires_grad
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_a.sum().backward()
    modules = _adapter_modules()
    ys = grouped_forward(modules, torch.randn(4, 16))
    (grad_a,) = torch.autograd.grad(sum(y.square().sum() for y in ys), modules[0].lora_A, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_a.sum().backward()


# --- the pseudo-inverse solve ------------------------------------------------------------------------------

def _gradient_and_a(rows=37, cols=50, rank=13, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bound = cols ** -0.5
    return torch.randn(rows, cols, generator=gen), (torch.rand(rank, cols, generator=gen) * 2 - 1) * bound


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


# --- offsets past 2^31 elements ---------------------------------------------------------------------------

_HUGE_OFFSETS_CHILD = """
import os, sys, torch
from gora_dist.kernels.matmul import two_product_matmul
from gora_dist.kernels.pinv_solve import projected_gradient_triton

K, N, STRIDE = 32, 16, 2 ** 27  # element (K-1)·STRIDE = 31·2^27 ≈ 4.2e9 > 2^31 - 1
numel = (K - 1) * STRIDE + N
path = os.path.join(sys.argv[1], "sparse.bin")
with open(path, "wb") as handle:
    handle.truncate(numel * 4)  # sparse: no disk blocks, no memory until a page is touched
storage = torch.from_file(path, shared=True, size=numel, dtype=torch.float32)
gen = torch.Generator().manual_seed(0)
values = torch.randn(K, N, generator=gen)
wide = storage.as_strided((K, N), (STRIDE, 1))  # K rows, STRIDE elements apart
wide.copy_(values)  # touches K pages
p1 = torch.randn(8, K, generator=gen)
out = two_product_matmul(torch.empty(8, N), p1, wide)  # ks * stride_q1k: dA = dS^T·x, K = tokens
torch.testing.assert_close(out, p1 @ values, atol=1e-5, rtol=1e-5)
q1 = torch.randn(K, 8, generator=gen)
out = two_product_matmul(torch.empty(N, 8), wide.t(), q1)  # ks * stride_p1k: dB = dY^T·S
torch.testing.assert_close(out, values.t() @ q1, atol=1e-5, rtol=1e-5)
lora_a = torch.randn(3, K, generator=gen)
got = projected_gradient_triton(wide.t(), lora_a)  # Ḡ rows with a column stride of 2^27
torch.testing.assert_close(got, values.t() @ lora_a.t(), atol=1e-5, rtol=1e-5)
print("ok")
"""


@pytest.mark.skipif(INTERPRETED, reason="runs its own interpreter child")
def test_reduction_offsets_past_2_31_elements(tmp_path):
    """Reduction offsets (k index × stride) are int64: dA and dB reduce over tokens, and tokens × width
    passes 2^31 elements at ~150k tokens of a 14336-wide layer. Such a tensor cannot be allocated here,
    so the operands are (K, 16) views, 2^27 elements apart, of a sparse 16 GiB memory-mapped file (only
    the K touched pages exist). With int32 offsets the interpreter wraps them (as a GPU would) and the
    load reads 512 MiB before the buffer: a crash or wrong values. Own child process, so a crash fails
    this test only."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "GORA_DISABLE_KERNELS": ""}
    result = subprocess.run([sys.executable, "-c", _HUGE_OFFSETS_CHILD, str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", (result.returncode, result.stderr[-3000:])


# --- the interpreter run and the GPU ------------------------------------------------------------------------

@pytest.mark.skipif(INTERPRETED, reason="this is the child run")
def test_interpreter_suite():
    """Run this file's CPU cases under TRITON_INTERPRET=1 in a child pytest (see the module docstring)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "GORA_DISABLE_KERNELS": ""}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
               "not gpu and not interpreter_suite and not sm90 and not benchmark_script and not past_2_31"]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                            cwd=os.path.dirname(__file__), check=False)
    summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"interpreter run: {summary} ({time.perf_counter() - start:.1f} s)")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in summary and "skipped" not in summary, summary


def test_one_tile_per_key_unless_autotuning_is_asked_for(monkeypatch):
    """Without GORA_KERNEL_AUTOTUNE a key compiles one tile and benchmarks none; every rank up to 32
    shares a key (a 1B model's 29 distinct ranks tuned one by one timed out on an H200)."""
    import triton

    from gora_dist.kernels import matmul

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3)
               for m, n in [(128, 128), (128, 64), (128, 32), (32, 32)]]
    monkeypatch.delenv(matmul.AUTOTUNE_ENV, raising=False)
    assert [c.kwargs["BLOCK_N"] for c in matmul.fitting_configs(configs, 4096, 8)] == [32]
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in matmul.fitting_configs(configs, 8, 4096)] == [(32, 32)]
    assert [c.kwargs["BLOCK_N"] for c in matmul.fitting_configs(configs, 4096, 4096)] == [128]
    monkeypatch.setenv(matmul.AUTOTUNE_ENV, "1")
    assert len(matmul.fitting_configs(configs, 4096, 4096)) == 4 and len(matmul.fitting_configs(configs, 4096, 8)) == 2
    assert {matmul.size_bucket(r) for r in range(1, 33)} == {32} and matmul.size_bucket(33) == 64


@pytest.mark.skipif(INTERPRETED, reason="compiles for a real GPU target; not needed in the interpreter run")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not compile; this lowers the kernels to PTX/cubin for an H100 (sm_90), no
    device needed, so GPU-only compile errors show up on CPU machines too."""
    from gora_dist.kernels import matmul, pinv_solve
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile
    from triton.runtime.autotuner import Autotuner

    def build(kernel, pointer_types, scalar_types, constants, **options):
        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel  # the autotuner wraps the jitted function
        signature = {}
        for name in fn.arg_names:
            signature[name] = "constexpr" if name in constants else pointer_types.get(name) or scalar_types.get(name, "i32")
        constexprs = {(fn.arg_names.index(name),): value for name, value in constants.items()}
        return triton_compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=options)

    floats = {"alpha1": "fp32", "alpha2": "fp32"}
    # (layer dtype, UPCAST1, PRECISION1, PRECISION2) as the launcher picks them: a 16-bit forward, a float32
    # layer, and a 16-bit dY against float32 B (dS, upcast, TF32)
    for layer, upcast, precision1, precision in [("bf16", False, "ieee", "tf32"), ("fp32", False, "ieee", "ieee"),
                                                 ("bf16", True, "tf32", "tf32")]:
        pointers = {name: "*fp32" for name in ("out_ptr", "p2_ptr", "q2_ptr", "c_in_ptr")}
        pointers.update(p1_ptr=f"*{layer}", q1_ptr="*fp32" if upcast else f"*{layer}", bias_ptr=f"*{layer}")
        constants = {"HAS_P2": True, "HAS_BIAS": True, "HAS_C_IN": True, "UPCAST1": upcast, "PRECISION1": precision1,
                     "PRECISION2": precision, "BLOCK_K2": 32, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}
        compiled = build(matmul._two_product_kernel, pointers, floats, constants, num_warps=8, num_stages=3)
        assert "cubin" in compiled.asm, list(compiled.asm)
    # Without autotuning nothing skips a tile that overflows shared memory: the tile taken for each kind of
    # output (wide, tokens × rank, rank × wide) must fit an H100 with float32 operands (the largest case)
    h100_shared_limit = 232_448
    pointers = {name: "*fp32" for name in ("out_ptr", "p1_ptr", "q1_ptr", "p2_ptr", "q2_ptr", "bias_ptr", "c_in_ptr")}
    taken = {id(matmul.fitting_configs(matmul._two_product_kernel.configs, m, n)[0]): (m, n)
             for m, n in [(8192, 4096), (8192, 8), (8, 4096), (8192, 48), (48, 4096), (8, 8)]}
    assert len(taken) >= 3  # wide, narrow-N and narrow-M outputs take different tiles
    for config in matmul._two_product_kernel.configs:
        if id(config) not in taken:
            continue
        constants = {"HAS_P2": True, "HAS_BIAS": True, "HAS_C_IN": True, "UPCAST1": False, "PRECISION1": "ieee",
                     "PRECISION2": "ieee", "BLOCK_K2": 64, **config.kwargs}
        compiled = build(matmul._two_product_kernel, pointers, floats, constants, num_warps=config.num_warps,
                         num_stages=config.num_stages)
        assert compiled.metadata.shared <= h100_shared_limit, (config, compiled.metadata.shared)
    # The pinv kernel is not autotuned, so the configs its launcher picks must fit an H100's shared memory
    # (232,448 B per block): the largest rank with the K⁻¹ epilogue, and the largest rank at all, asked
    # with and without a solve (above MAX_SOLVE_RANK the launcher leaves the solve to torch).
    pointers = {name: "*fp32" for name in ("out_ptr", "grad_ptr", "a_ptr", "kinv_ptr")}
    for rank, solve in [(pinv_solve.MAX_SOLVE_RANK, True), (pinv_solve.MAX_RANK, True), (pinv_solve.MAX_RANK, False)]:
        config = pinv_solve.launch_config(rank, solve)
        options = {key: config.pop(key) for key in ("num_warps", "num_stages")}
        compiled = build(pinv_solve._project_solve_kernel, pointers, {"neg_xi": "fp32"}, config, **options)
        assert "cubin" in compiled.asm
        assert compiled.metadata.shared <= h100_shared_limit, (rank, config, compiled.metadata.shared)


# GPU: bf16 and realistic sizes. TF32 rank-r products for 16-bit layers, cuBLAS in the reference:
# compare by relative Frobenius error; each bound has its reason.
GPU_BOUNDS = [
    (torch.bfloat16, 8e-3),  # bf16 output rounding (2^-9 relative per element, averaged) + TF32 adapter dots
    (torch.float16, 2e-3),  # fp16 output rounding (2^-11) + TF32 adapter dots
    (torch.float32, 1e-5),  # exact float32 ("ieee") everywhere, only the order differs
]



@gpu
@pytest.mark.parametrize("rank", [4, 13, 32])
@pytest.mark.parametrize(("dtype", "bound"), GPU_BOUNDS)
def test_gpu_lora_linear_realistic_sizes(dtype, bound, rank):
    x, weight, bias, lora_a, lora_b, grad_out = _layer(dtype, rank, in_features=4096, out_features=1024,
                                                       tokens=(2, 1024), device="cuda")
    scaling = 2 / math.sqrt(rank)
    got = _outputs_and_grads(lora_linear, x, weight, bias, lora_a, lora_b, scaling, grad_out)
    want = _outputs_and_grads(lora_linear_reference, x, weight, bias, lora_a, lora_b, scaling, grad_out)
    for name, g, w in zip(["y", "dX", "dA", "dB"], got, want):
        assert g.dtype == w.dtype and _relative_error(g, w) < bound, (name, _relative_error(g, w))


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


@gpu
@pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_tensors_on_a_device_other_than_the_current_one():
    """Triton launches on the current device: the launchers switch to the tensors' device first."""
    from gora_dist.kernels.pinv_solve import projected_gradient_triton

    x, weight, bias, lora_a, lora_b, grad_out = _layer(torch.float32, 5, device="cuda:1")
    with torch.cuda.device(0):
        got = _outputs_and_grads(lora_linear, x, weight, bias, lora_a, lora_b, 1.5, grad_out)
        grad, a0 = _gradient_and_a(rows=64, cols=96, rank=8)
        c = projected_gradient_triton(grad.to("cuda:1"), a0)
        torch.cuda.synchronize(1)
    want = _outputs_and_grads(lora_linear_reference, x, weight, bias, lora_a, lora_b, 1.5, grad_out)
    for name, g, w in zip(["y", "dX", "dA", "dB"], got, want):
        assert g.device == w.device and _relative_error(g, w) < 1e-5, (name, _relative_error(g, w))
    assert _relative_error(c.cpu(), projected_gradient_reference(grad, a0)) < 1e-5


@gpu
def test_gpu_pinv_init_of_a_4096_layer():
    from gora_dist.kernels.pinv_solve import pinv_init_b_triton

    grad, lora_a = _gradient_and_a(rows=4096, cols=4096, rank=32)
    grad = grad.cuda()
    b0 = pinv_init_b_triton(grad, lora_a, 0.3)
    assert _relative_error(b0, pinv_init_b_reference(grad, lora_a, 0.3)) < 1e-5  # float32 vs float64 solve


# --- the benchmark script's CPU-side logic (it needs CUDA to measure anything) -----------------------------

@pytest.mark.skipif(INTERPRETED, reason="no kernels run here")
def test_benchmark_script_tables_and_results(tmp_path, capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "kernel_speed.py")
    spec = importlib.util.spec_from_file_location("kernels_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ranks = bench.rank_map()
    assert len(ranks) == 224 and min(ranks.values()) == 4 and max(ranks.values()) <= 32
    chosen = bench.ranks_per_kind(ranks, quick=False)
    assert set(chosen) == {"q/o", "k/v", "gate/up", "down"} and all(4 <= r <= 32 for rs in chosen.values() for r in rs)
    if not torch.cuda.is_available():
        assert bench.main([]) == 2 and "needs a CUDA GPU" in capsys.readouterr().out
    layers = [{"kind": "q/o", "rank": 8, "tokens": 2048, "impl": impl, **{f"{m}_ms": [1.0, 0.9, 1.1] for m in bench.MODES}}
              for impl in bench.IMPLEMENTATIONS]
    grouped = [{"kind": "q+k+v", "ranks": [8, 4, 6], "tokens": 2048, "impl": i, "full_ms": [2.0, 1.9, 2.1]}
               for i in ("grouped", "separate")]
    init = [{"impl": "fused", "layers": 224, "total_ms": [10.0, 9.0, 11.0]}]
    meta = {"gpu": "Test GPU 80GB", "cuda": "12.x", "versions": {}, "commit": "abc", "date": "today", "dry_run": False}
    stem = bench.write_results(str(tmp_path), meta, layers, grouped, init, {"4": 1})
    assert stem.endswith("kernels_test_gpu_80gb")
    with open(stem + ".md") as handle:
        table = handle.read()
    assert "| q/o | 8 | 2048 | full |" in table and "| fused | 10.00 (9.00-11.00) |" in table
