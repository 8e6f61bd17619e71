"""The optimizer and learning-rate schedule of every training run here (the launcher and the quality
benchmarks): AdamW with LoRA+ groups, linear warm-up, then cosine or linear decay to a floor."""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(step: int, *, steps: int, warmup_ratio: float, schedule: str = "cosine", min_lr_ratio: float = 0.0) -> float:
    """The rate's factor after ``step`` optimizer steps: linear warm-up over round(warmup_ratio × steps)
    steps (none when the ratio is 0), then cosine or linear decay to ``min_lr_ratio`` at ``steps``, or
    constant."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {list(SCHEDULES)}")
    warmup = max(1, int(round(warmup_ratio * steps))) if warmup_ratio > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_lr_ratio + (1 - min_lr_ratio) * shape


def lora_plus_groups(named: Sequence[Tuple[str, nn.Parameter]], lr: float, loraplus_lr_ratio: float,
                     weight_decay: float) -> List[dict]:
    """AdamW groups: every B (GoRA's ``.lora_B`` and PEFT's ``lora_B.<adapter>``) at lr × loraplus_lr_ratio
    (LoRA+), the A's and fully trained modules at lr; an empty group is left out."""
    groups = [
        {"params": [p for n, p in named if "lora_B" not in n], "lr": lr, "name": "lora_A and full"},
        {"params": [p for n, p in named if "lora_B" in n], "lr": lr * loraplus_lr_ratio, "name": "lora_B"},
    ]
    return [dict(group, weight_decay=weight_decay) for group in groups if group["params"]]


def make_optimizer(named: Sequence[Tuple[str, nn.Parameter]], *, lr: float, steps: int, loraplus_lr_ratio: float = 1.0,
                   weight_decay: float = 0.0, warmup_ratio: float = 0.0, schedule: str = "cosine",
                   min_lr_ratio: float = 0.0):
    """(AdamW over :func:`lora_plus_groups`, a LambdaLR following :func:`lr_factor`)."""
    optimizer = torch.optim.AdamW(lora_plus_groups(named, lr, loraplus_lr_ratio, weight_decay), lr=lr,
                                  weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, steps=steps, warmup_ratio=warmup_ratio, schedule=schedule, min_lr_ratio=min_lr_ratio))
    return optimizer, scheduler


def set_schedule_step(optimizer, scheduler, step: int) -> None:
    """Put a LambdaLR (and its optimizer's learning rates) where it is after ``step`` optimizer steps."""
    scheduler.last_epoch = step
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
