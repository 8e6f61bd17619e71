"""GoRALinear, and the few free functions that put adapters into a model or fold them out of it."""

from __future__ import annotations

from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .initialization import rslora_scaling


class GoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank update: y = base(x) + s·(drop(x)·Aᵀ)·Bᵀ.

    ``base`` is the original module, untouched; ``lora_A``: (rank, in), ``lora_B``: (out, rank),
    both float32 (PEFT's choice for half-precision bases, keeps small updates from rounding away);
    ``scaling`` = α/√rank with rsLoRA (the paper's runs), else α/rank. The adapters start at zero:
    GoRA's initialisation (or a checkpoint) fills them.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """{"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)} for every adapter, detached."""
    state = {}
    for name, module in gora_modules(model):
        state[f"{name}.lora_A"] = module.lora_A.detach()
        state[f"{name}.lora_B"] = module.lora_B.detach()
    return state


def saved_modules(model: nn.Module, names: Sequence[str]) -> Dict[str, nn.Module]:
    """Modules matched by ``names`` (PEFT's modules_to_save rule: the name or a ``.name`` suffix)."""
    found = {n: m for n, m in model.named_modules() if n and any(n == t or n.endswith("." + t) for t in names)}
    missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in found)]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no module of this model")
    return found


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
    rounds the update; keep the adapter files if exact outputs matter.
    """
    for name, module in list(gora_modules(model)):
        base = module.base
        base.weight.add_(module.delta_weight().to(device=base.weight.device, dtype=base.weight.dtype))
        set_submodule(model, name, base)
    return model


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
    saved_params = {}
    if saved_state:
        params = dict(model.named_parameters())
        for key, value in saved_state.items():
            if key not in params or tuple(params[key].shape) != tuple(value.shape):
                have = tuple(params[key].shape) if key in params else "nothing"
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
    with torch.no_grad():
        for param, value in saved_params.values():
            if param.device.type != "meta":
                param.copy_(value)
    mark_only_adapters_trainable(model, modules_to_save)
    return adapters
