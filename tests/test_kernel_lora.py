"""The fused LoRA layer (``lora_linear``) against its torch reference, output and every gradient over
(dtype, atol, rtol), its fallbacks and errors, and GoRALinear's kernel path and when it steps aside.

CPU cases (``interpreted``) run only under Triton's interpreter: in a normal session they skip and
``test_interpreter_suite`` (tests/test_kernel_dispatch.py) runs them, with the other kernel files', in one
child pytest with TRITON_INTERPRET=1; to run them directly: ``TRITON_INTERPRET=1 python -m pytest FILE -k "not gpu"``.
GPU cases (names contain ``gpu``) run in-process when CUDA is there. Everything skips without triton.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' brings it)")

from gora_dist.kernels import (
    grouped_lora_linear,
    lora_linear,
    lora_linear_reference,
    triton_can_run,
)
from kernel_cases import (
    ADAPTER_TOLERANCE,
    GPU_BOUNDS,
    LAYER_TOLERANCES,
    _adapter_modules,
    _assert_matches,
    _layer,
    _outputs_and_grads,
    _relative_error,
    gpu,
    interpreted,
)
from kernel_cases import _kernels_asked_for  # noqa: F401  (autouse: the tests here ask for the kernels)

RANKS = [1, 3, 7, 13, 17, 32]


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
