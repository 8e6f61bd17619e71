"""The fine-tuning methods the quality benchmarks compare: PEFT's LoRA variants, full fine-tuning and
GoRA's variants, one definition each whatever the task (classification in quality.py, SFT in
quality_sft.py).

Each method is a ``prepare(model, batches, seed, held_batch=None) -> model to train``: ``batches``
are the estimation batches (GoRA's and LoRA-GA's gradient steps, EVA's forward passes), the same for
every method of a run; ``held_batch`` is one more batch, for GoRA's adaptive γ search only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

from gora_dist import GoRAConfig, apply_gora
from gora_dist.model.layers import gora_modules

Prepare = Callable[..., nn.Module]


@dataclass(frozen=True)
class MethodSetting:
    """What every method shares: the layers adapted, PEFT's task type, LoRA's rank and α, GoRA's γ
    and rank range, the modules trained in full by every method (a new head)."""

    targets: Union[str, Sequence[str]]
    task_type: str  # PEFT's: "SEQ_CLS" or "CAUSAL_LM"
    rank: int = 8
    alpha: float = 16.0
    gamma: float = 5e-2
    rank_min: int = 4
    rank_max: int = 32
    modules_to_save: Sequence[str] = ()
    eva_label_mask: bool = False
    """EVA's inputs: only the tokens with labels (True) or every non-padding token (False)."""


def _peft_config(setting: MethodSetting, **options):
    from peft import LoraConfig

    targets = setting.targets if isinstance(setting.targets, str) else list(setting.targets)
    return LoraConfig(task_type=setting.task_type, r=setting.rank, lora_alpha=setting.alpha, lora_dropout=0.0,
                      target_modules=targets, **options)


def _peft(setting: MethodSetting, **options) -> Prepare:
    def prepare(model, batches, seed, held_batch=None):
        from peft import get_peft_model

        return get_peft_model(model, _peft_config(setting, **options))
    return prepare


def _lora_ga(setting: MethodSetting) -> Prepare:
    def prepare(model, batches, seed, held_batch=None):
        from peft import LoraGAConfig, get_peft_model
        from peft.tuners.lora.loraga import preprocess_loraga

        config = _peft_config(setting, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

        def train_step():
            for batch in batches:
                with torch.enable_grad():
                    model(**batch).loss.backward()

        preprocess_loraga(model, config, train_step)
        return get_peft_model(model, config)
    return prepare


def _eva(setting: MethodSetting) -> Prepare:
    def prepare(model, batches, seed, held_batch=None):
        from peft import EvaConfig, get_peft_model, initialize_lora_eva_weights

        config = _peft_config(setting, init_lora_weights="eva",
                              eva_config=EvaConfig(rho=2.0, use_label_mask=setting.eva_label_mask))
        peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
        # EVA's forwards need no loss scale: every tensor input, none of the floats
        inputs = [{k: v for k, v in batch.items() if torch.is_tensor(v)} for batch in batches]
        initialize_lora_eva_weights(peft_model, dataloader=inputs, show_progress_bar=False)
        return peft_model
    return prepare


def _gora(setting: MethodSetting, **options) -> Prepare:
    def prepare(model, batches, seed, held_batch=None):
        settings = dict(target_modules=setting.targets, rank_ref=setting.rank, rank_min=setting.rank_min,
                        rank_max=setting.rank_max, alpha=setting.alpha, gamma=setting.gamma, fit_budget=True,
                        grad_steps=len(batches), seed=seed, modules_to_save=list(setting.modules_to_save))
        settings.update(options)
        if settings.get("adaptive_gamma") and held_batch is None:
            raise ValueError("GoRA's adaptive γ search needs a held batch: pass held_batch=")
        model.gora_report = apply_gora(model, batches, GoRAConfig(**settings), held_batch=held_batch)  # γ, ranks
        return model
    return prepare


def _full(model, batches, seed, held_batch=None):
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def methods(setting: MethodSetting, names: Optional[Sequence[str]] = None) -> Dict[str, Prepare]:
    """{name: prepare}, in the benchmarks' order; ``names`` keeps a subset (unknown names are an error)."""
    table: Dict[str, Prepare] = {
        "LoRA": _peft(setting),
        "rsLoRA": _peft(setting, use_rslora=True),
        "DoRA": _peft(setting, use_dora=True),
        "PiSSA": _peft(setting, init_lora_weights="pissa"),
        "LoRA-GA": _lora_ga(setting),
        "EVA": _eva(setting),
        "full FT": _full,
        "GoRA": _gora(setting),
        "GoRA γ=0": _gora(setting, gamma=0.0),
        "GoRA fixed ranks": _gora(setting, rank_min=setting.rank, rank_max=setting.rank),
        "GeLoRA ranks (GoRA init)": _gora(setting, allocator="gelora", gelora_scale_to_budget=True),
        "GoRA γ search": _gora(setting, adaptive_gamma=True),
        "LoRA-One": _gora(setting, allocator="uniform", initializer="lora_one"),
        "GoRA ranks (LoRA-One init)": _gora(setting, initializer="lora_one"),
    }
    if names is None:
        return table
    unknown = [name for name in names if name not in table]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; choose from {list(table)}")
    return {name: table[name] for name in names}


def adapter_ranks(model: nn.Module) -> Dict[str, int]:
    """{layer name: rank} from GoRA's modules or PEFT's LoRA layers (EVA redistributes ranks too)."""
    ranks = {name: module.rank for name, module in gora_modules(model)}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and "default" in lora_a:
            ranks[name.replace("base_model.model.", "")] = lora_a["default"].out_features
    return ranks


def trainable_parameters(model: nn.Module, exclude: str = "") -> int:
    """Parameters that train, leaving out those whose name contains ``exclude`` (a head every method trains)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not (exclude and exclude in n))
