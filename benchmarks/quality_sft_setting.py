"""What quality_sft.py's runs and quality_sft_report.py's tables both need: the adapted projections,
the methods' shared setting and the protocol's Setting. Its own module because the report cannot
import quality_sft.py (run as a script, that would load it a second time)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from adapter_methods import MethodSetting, methods

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHOD_SETTING = MethodSetting(targets=TARGETS, task_type="CAUSAL_LM", rank=8, alpha=16.0, gamma=5e-2)
METHODS = methods(METHOD_SETTING)
REGIME_GAMMAS = (0.0, 1e-2, 5e-2, 8e-2, 0.2)


@dataclass
class Setting:
    """What one invocation runs. Defaults are the full protocol."""

    model: str = "smollm2"
    train_examples: int = 0  # 0: all 1,845
    val_examples: int = 200
    test_examples: int = 400
    max_length: int = 128
    skip_long: bool = False  # the tiny Llama's byte tokens: leave the longest problems out
    max_new_tokens: int = 8
    batch_size: int = 8
    steps: int = 150
    early_fraction: float = 0.25
    warmup_fraction: float = 0.03
    min_lr_ratio: float = 0.1
    grad_steps: int = 8
    probe_steps: Sequence[int] = (0, 1, 2, 5, 10, 20, 40, 75)
    probe_examples: int = 128
    lr_grid: Sequence[float] = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)  # the walk stops at an edge: the table marks it
    lr_start: float = 3e-4
    seeds: Sequence[int] = (0, 1, 2)
    methods: Sequence[str] = field(default_factory=lambda: list(METHODS))
    regime_rates: Sequence[float] = (5e-5, 2e-4)
    regime_gammas: Sequence[float] = REGIME_GAMMAS
    loraplus_ratio: float = 16.0
    regime_weight_decay: float = 5e-4
    precision: str = "bf16"
    quantization: str = "none"  # nf4: the base loaded 4-bit by bitsandbytes (QLoRA), float32 compute under bf16 autocast


QUICK = dict(model="tiny-llama", max_length=256, skip_long=True, train_examples=64, val_examples=16, test_examples=16, max_new_tokens=4, steps=4,
             grad_steps=2, probe_steps=(0, 1), probe_examples=8, lr_grid=(1e-3, 3e-3), lr_start=1e-3, seeds=(0,),
             regime_rates=(1e-3,), regime_gammas=(0.0, 5e-2))
QLORA_METHODS = ("rsLoRA", "GoRA")
"""On a 4-bit base: GoRA against its control at equal budget (rsLoRA: the same α/√r scale, no init)."""
TIMING = dict(steps=20, probe_steps=(), test_examples=8, lr_grid=(3e-4,), lr_start=3e-4, seeds=(0,))
