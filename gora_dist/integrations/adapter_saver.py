"""The adapters written into each Trainer checkpoint (``checkpoint-N/gora_adapter``) and at the end
of training, in PEFT's format with gora.json: the plan travels with the checkpoints, so a resumed
run reads its rank map back instead of estimating again."""

from __future__ import annotations

import os
import re
from typing import Dict, Tuple

import torch
import torch.nn as nn

from gora_dist.comm.gather import full_parameters
from gora_dist.integrations.run_plan import rank_and_world
from gora_dist.model.adapter_io import save_plan
from gora_dist.report import GoRAPlan

SUBFOLDER = "gora_adapter"


ADAPTER_PARAMETER = re.compile(r"^(?:module\.)?(?:_orig_mod\.)?(?:base_model\.model\.)?(?P<layer>.+)\.lora_(?P<side>[AB])"
                               r"(?:\.[^.]+\.weight)?$")
"""GoRA's ``<layer>.lora_A`` or PEFT's ``base_model.model.<layer>.lora_A.<adapter>.weight``, under a
DDP (``module.``) or compiled (``_orig_mod.``) wrapper."""


def gather_adapters(model: nn.Module) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Full (A, B) of every adapter by layer name (in the base model), on every rank, whether GoRA's
    layers or PEFT's, plain, FSDP2 DTensors or ZeRO-3 partitioned. A collective when sharded: every
    rank must call it."""
    tensors = full_parameters(model, lambda name: ADAPTER_PARAMETER.match(name) is not None)
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        found = ADAPTER_PARAMETER.match(name)
        pairs.setdefault(found["layer"], {})[found["side"]] = tensor
    return {layer: (pair["A"], pair["B"]) for layer, pair in sorted(pairs.items())}


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class GoRAAdapterSaver(_trainer_callback_base()):
    """Writes the adapters in PEFT format (+ gora.json) into each Trainer checkpoint folder
    (``checkpoint-N/gora_adapter``) and into ``output_dir/gora_adapter`` at the end of training."""

    def __init__(self, plan: GoRAPlan, subfolder: str = SUBFOLDER) -> None:
        self.plan, self.subfolder = plan, subfolder

    def _write(self, model, folder: str) -> None:
        adapters = gather_adapters(model)
        if rank_and_world()[0] == 0:
            current = self.plan.with_adapters(adapters)
            save_plan(current, os.path.join(folder, self.subfolder), model)

    def on_save(self, args, state, control, model=None, **kwargs):
        self._write(model, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._write(model, args.output_dir)
