"""GoRALinear, and the few free functions that put adapters into a model or fold them out of it."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.nn.modules import module as _module_hooks

from gora_dist.comm.gather import write_full
from gora_dist.kernels import KERNEL_DTYPES, triton_can_run
from gora_dist.method.initialization import rslora_scaling
from gora_dist.model.quantized import is_quantized
from gora_dist.model.targets import saved_modules


def _global_module_hooks() -> bool:
    """Whether any global module hook (``torch.nn.modules.module.register_module_*_hook``) is registered:
    such hooks run for every module called, so bypassing a call would skip them."""
    return bool(_module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks
                or _module_hooks._global_backward_hooks or _module_hooks._global_backward_pre_hooks)


def _calls_only_forward(module: nn.Module, forward) -> bool:
    """Whether ``module(x)`` would run nothing but ``forward(module, x)``, so code may compute that result
    without calling the module: ``forward`` is the class's forward and is not replaced on the instance
    (accelerate's ``add_hook_to_module`` sets ``module.forward`` and ``module._hf_hook``), and there are no
    forward, pre-forward or backward hooks on the module nor global module hooks."""
    return (type(module).forward is forward and "forward" not in vars(module) and not hasattr(module, "_hf_hook")
            and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                     or module._backward_pre_hooks)
            and not _global_module_hooks())


class GoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank update: y = base(x) + s·(drop(x)·Aᵀ)·Bᵀ.

    ``base`` is the original module, untouched; ``lora_A``: (rank, in), ``lora_B``: (out, rank),
    both float32 (PEFT's choice for half-precision bases, keeps small updates from rounding away);
    ``scaling`` = α/√rank with rsLoRA (the paper's runs), else α/rank. The adapters start at zero:
    GoRA's initialisation (or a checkpoint) fills them.

    ``use_kernel`` (default True): on CUDA with ``GORA_KERNELS=1`` and triton installed, forward runs
    the fused Triton layer (``gora_dist.kernels.lora``) whenever it computes the same thing as the
    torch path and bypassing ``self.base(x)`` skips nothing; see :meth:`kernel_applies`. Without
    ``GORA_KERNELS=1`` it is torch's path: faster on the one GPU measured (docs/kernels.md).
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        *,
        alpha: float,
        use_rslora: bool = True,
        dropout: float = 0.0,
        adapter_dtype: torch.dtype = torch.float32,
        use_kernel: bool = True,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank={rank}: a GoRALinear needs rank >= 1 (rank 0 means: leave the layer alone)")
        self.base = base
        for param in base.parameters():
            param.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = rslora_scaling(alpha, rank, use_rslora)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features, dtype=adapter_dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=adapter_dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.use_kernel = use_kernel

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (some model code reads ``.weight.dtype`` of its linear layers)."""
        return self.base.weight

    def kernel_applies(self, x: torch.Tensor) -> bool:
        """Whether forward may take the fused Triton path for this input; else the torch path.

        The kernel reads ``base.weight`` directly instead of calling ``self.base(x)``, so it is used only
        when nothing is lost by that: a plain ``nn.Linear`` with a frozen, fully materialised weight (not
        a DeepSpeed ZeRO-3 parameter, whose gathering and prefetch bookkeeping live in the base module's
        hooks; not an FSDP2 DTensor: under ``fully_shard`` of the enclosing block the weight is a plain
        unsharded tensor during forward and qualifies; no other tensor subclass either), no forward,
        pre-forward or backward hooks on the base, no global module hooks, no instance-level
        ``base.forward`` (accelerate's hooks), no active dropout (the adapter would see a different x than
        the base), no autocast on x's device (the Function does not cast), not inside torch.compile,
        matching dtypes, and everything on one CUDA device (or on the CPU under ``TRITON_INTERPRET=1``,
        which is for tests: the interpreter is slow).
        """
        base = self.base
        if not (self.use_kernel and type(base) is nn.Linear and _calls_only_forward(base, nn.Linear.forward)):
            return False
        weight, bias = base.weight, base.bias
        if hasattr(weight, "ds_id") or hasattr(weight, "device_mesh"):
            return False
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return False
        if self.training and not isinstance(self.dropout, nn.Identity):
            return False
        if torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling():
            return False
        if x.dtype not in KERNEL_DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            return False
        if self.lora_A.dtype not in KERNEL_DTYPES or self.lora_B.dtype != self.lora_A.dtype:
            return False
        return triton_can_run(x, weight, bias, self.lora_A, self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_applies(x):
            # imports triton on first use only
            from gora_dist.kernels.lora import lora_linear_triton

            return lora_linear_triton(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling)
        # Call self.base(...) rather than F.linear(x, self.base.weight): engines that shard the
        # weight (ZeRO-3) gather it in the base module's own forward hooks.
        result = self.base(x)
        shrunk = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T
        return result + (self.scaling * (shrunk @ self.lora_B.T)).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B·A: (out, in) float32, the update this adapter adds to the base weight."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:.4g}"


def grouped_forward(modules: Sequence[GoRALinear], x: torch.Tensor) -> List[torch.Tensor]:
    """[module(x) for module in modules] for GoRALinear layers that share their input (q/k/v, gate/up).

    When every module takes the kernel path (:meth:`GoRALinear.kernel_applies`), their adapters share
    a dtype and calling the modules would run nothing but their forwards (no hooks on the GoRALinear
    modules themselves, no global module hooks, no replaced ``forward``), one shrink GEMM computes x·Aᵢᵀ
    for all of them (``gora_dist.kernels.grouped_lora``); else each module is called, hooks and all. Use it in a model's attention or MLP forward, e.g.
    ``q, k, v = grouped_forward([self.q_proj, self.k_proj, self.v_proj], hidden_states)``.
    """
    modules = list(modules)
    if len(modules) > 1 \
            and all(isinstance(m, GoRALinear) and _calls_only_forward(m, GoRALinear.forward) for m in modules) \
            and len({m.lora_A.dtype for m in modules}) == 1 and all(m.kernel_applies(x) for m in modules):
        from gora_dist.kernels.grouped_lora import grouped_lora_linear_triton

        return grouped_lora_linear_triton(
            x, [m.base.weight for m in modules], [m.base.bias for m in modules], [m.lora_A for m in modules],
            [m.lora_B for m in modules], [m.scaling for m in modules])
    return [module(x) for module in modules]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``module``."""
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, module)


def gora_modules(model: nn.Module) -> Iterator[Tuple[str, GoRALinear]]:
    """(name, module) for every GoRALinear in the model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, GoRALinear):
            yield name, module


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block every GoRALinear computes its base layer alone (scale 0): to score the base
    model through the same wrapped, sharded model, with no second copy."""
    saved = [(module, module.scaling) for _, module in gora_modules(model)]
    try:
        for module, _ in saved:
            module.scaling = 0.0
        yield model
    finally:
        for module, scaling in saved:
            module.scaling = scaling


def mark_only_adapters_trainable(model: nn.Module, modules_to_save: Sequence[str] = ()) -> None:
    """Freeze every parameter but the adapters' A and B (LoRA training) and the modules to save."""
    for param in model.parameters():
        param.requires_grad_(False)
    for _, module in gora_modules(model):
        module.lora_A.requires_grad_(True)
        module.lora_B.requires_grad_(True)
    for module in saved_modules(model, modules_to_save).values():
        for param in module.parameters():
            param.requires_grad_(True)


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W ← W + s·B·A) and put the plain nn.Linear back.

    For serving without adapter support. The merged weight keeps the base dtype, so a bf16 base
    rounds the update; keep the adapter files if exact outputs matter. A quantised base is refused
    before anything changes (the update would be rounded into 4 or 8 bits).
    """
    quantized = [name for name, module in gora_modules(model) if is_quantized(module.base)]
    if quantized:
        raise ValueError(f"{quantized[0]}: the base is quantised; merging would re-quantise it. Keep the adapter "
                         "(PEFT loads it on the quantised base) or merge into a float copy of the model")
    for name, module in list(gora_modules(model)):
        base = module.base
        base.weight.add_(module.delta_weight().to(device=base.weight.device, dtype=base.weight.dtype))
        set_submodule(model, name, base)
    return model


def check_adapters_fit(model: nn.Module, weights: Mapping[str, Tuple[torch.Tensor, torch.Tensor]]) -> list:
    """[(name, base nn.Linear, A, B)] for adapters {name: (A (r, in), B (out, r))}, or a ValueError
    naming the first module that is missing, not an ``nn.Linear``, or of another shape."""
    checked = []
    for name, (lora_a, lora_b) in weights.items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the adapter has module {name}, which this model does not have") from None
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{name} is a {type(base).__name__} in this model, not an nn.Linear")
        rank = lora_a.shape[0]
        expected = ((rank, base.in_features), (base.out_features, rank))
        if (tuple(lora_a.shape), tuple(lora_b.shape)) != expected:
            raise ValueError(
                f"{name}: adapter shapes A{tuple(lora_a.shape)} B{tuple(lora_b.shape)} do not fit the model's "
                f"layer (out={base.out_features}, in={base.in_features}) at rank {rank} "
                f"(expected A{expected[0]} B{expected[1]})"
            )
        checked.append((name, base, lora_a, lora_b))
    return checked


def install_adapters(
    model: nn.Module,
    weights: Mapping[str, Tuple[torch.Tensor, torch.Tensor]],
    *,
    alpha: float,
    use_rslora: bool = True,
    dropout: float = 0.0,
    modules_to_save: Sequence[str] = (),
    saved_state: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, GoRALinear]:
    """Wrap each named ``nn.Linear`` in a GoRALinear with the given (A (r, in), B (out, r)), then
    freeze all but the adapters and ``modules_to_save`` (whose weights come from ``saved_state``,
    {"<module>.<param>": tensor}, when given). Every name and shape is checked before the model is
    touched. On a meta-device base the adapters stay on meta (nothing to copy yet)."""
    checked = check_adapters_fit(model, weights)
    saved_params = {}
    if saved_state:
        params = dict(model.named_parameters())
        shapes = {key: tuple(getattr(param, "ds_shape", param.shape)) for key, param in params.items()}  # ZeRO-3: full shape
        for key, value in saved_state.items():
            if key not in params or shapes[key] != tuple(value.shape):
                have = shapes[key] if key in params else "nothing"
                raise ValueError(f"saved module weight {key} {tuple(value.shape)} does not fit this model ({have})")
            saved_params[key] = (params[key], value)
    adapters = {}
    for name, base, lora_a, lora_b in checked:
        adapter = GoRALinear(base, lora_a.shape[0], alpha=alpha, use_rslora=use_rslora, dropout=dropout)
        if adapter.lora_A.device.type != "meta":
            with torch.no_grad():
                adapter.lora_A.copy_(lora_a)
                adapter.lora_B.copy_(lora_b)
        set_submodule(model, name, adapter)
        adapters[name] = adapter
    for param, value in saved_params.values():
        write_full(param, value)
    mark_only_adapters_trainable(model, modules_to_save)
    return adapters
