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
from gora_dist.model.adapter_io import GORA_FILE, peft_adapter_folder, save_plan, write_plan_metadata
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
    """The plan in every Trainer checkpoint and at the end of training.

    GoRA's own layers: the adapters in PEFT format with gora.json in ``checkpoint-N/gora_adapter`` and
    ``output_dir/gora_adapter``. A PEFT model: the Trainer's checkpoint holds its adapter already
    (converted for the original base by ``model/peft_offset`` where the base is offset), so only
    gora.json goes beside it; a second adapter folder there would be loaded by the Trainer's resume
    as another adapter."""

    def __init__(self, plan: GoRAPlan, subfolder: str = SUBFOLDER) -> None:
        self.plan, self.subfolder = plan, subfolder

    def _write(self, model, folder: str) -> None:
        adapters = gather_adapters(model)
        if rank_and_world()[0] == 0:
            current = self.plan.with_adapters(adapters)
            save_plan(current, os.path.join(folder, self.subfolder), model)

    def on_save(self, args, state, control, model=None, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        peft_folder = _peft_adapter_folder(model, checkpoint)
        if peft_folder is None:
            self._write(model, checkpoint)
        elif rank_and_world()[0] == 0 and not os.path.isfile(os.path.join(peft_folder, GORA_FILE)):
            write_plan_metadata(peft_folder, self.plan.report)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._write(model, args.output_dir)


def _peft_adapter_folder(model, checkpoint: str):
    """Where the Trainer wrote the PEFT model's adapter in ``checkpoint`` (PEFT's layout: the default
    adapter at the top, another in its own subfolder); None for a model that is not a PEFT model."""
    inner = getattr(model, "module", model)  # a DDP wrapper
    configs = getattr(inner, "peft_config", None)
    if not isinstance(configs, dict) or not hasattr(inner, "active_adapters"):
        return None
    return peft_adapter_folder(checkpoint, inner.active_adapters[0])
