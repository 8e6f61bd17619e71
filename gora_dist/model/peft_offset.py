"""A PEFT model on an offset base (LoRA-GA, PiSSA: W − s·B0·A0) whose adapter files apply to the
**original** model, wherever PEFT or the Trainer writes them.

PEFT's own answer is ``save_pretrained(path, path_initial_model_for_weight_conversion=...)``, which
it refuses for rsLoRA with a ``rank_pattern`` (every GoRA plan). So the model's ``save_pretrained``
lets PEFT write its files into a staging folder, rewrites the adapter there as the rank-2r
[A; A0], [B, −B0] with ``gora.json`` (``model/converted_adapter``, the same files ``save_plan``
writes), then moves them into place: no folder ever holds the offset-base adapter under PEFT's name.
The model's ``load_adapter`` reads such a folder back into the offset model (the trained halves,
after checking A0/B0 are its own), which is what the Trainer's resume and ``load_best_model_at_end``
call. Both are bound to the one model instance; its class is PEFT's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import types
from typing import Dict

import torch

from gora_dist.comm.gather import write_full
from gora_dist.model.adapter_io import (CONFIG_FILE, GORA_FILE, WEIGHTS_FILE, _read_json, _saved_weights,
                                       peft_adapter_folder, save_plan)
from gora_dist.model.converted_adapter import plan_from_converted
from gora_dist.report import GoRAPlan, GoRAReport


def keep_original_base_files(peft_model, adapter_name: str, plan: GoRAPlan) -> None:
    """From now on ``peft_model.save_pretrained`` writes adapter ``adapter_name`` converted for the
    original base, and ``peft_model.load_adapter`` takes such a folder back (``plan``: the one whose
    A0/B0 offset the base)."""
    plans: Dict[str, GoRAPlan] = peft_model.__dict__.setdefault("_gora_offset_plans", {})
    plans[adapter_name] = plan
    if "save_pretrained" not in peft_model.__dict__:
        peft_model.__dict__["save_pretrained"] = types.MethodType(_save_converted, peft_model)
        peft_model.__dict__["load_adapter"] = types.MethodType(_load_converted, peft_model)


def _save_converted(self, save_directory: str, *args, **kwargs):
    if kwargs.get("path_initial_model_for_weight_conversion") is not None:
        raise ValueError("save_pretrained: this model's adapter is converted for the original base already (GoRA "
                         "writes [A; A0], [B, -B0]); leave out path_initial_model_for_weight_conversion")
    if kwargs.get("safe_serialization", True) is False:
        raise ValueError("save_pretrained(safe_serialization=False): the adapter converted for the original base is "
                         "written as safetensors only")
    peft_save = type(self).save_pretrained
    if not kwargs.get("is_main_process", True):
        return peft_save(self, save_directory, *args, **kwargs)  # PEFT writes nothing on the other ranks
    parent = os.path.dirname(os.path.abspath(save_directory))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".gora-save-", dir=parent)
    try:
        peft_save(self, staging, *args, **kwargs)
        selected = kwargs.get("selected_adapters") or list(self.peft_config)
        for adapter_name, plan in self._gora_offset_plans.items():
            if adapter_name in selected:
                _convert_in_place(peft_adapter_folder(staging, adapter_name), plan, self.peft_config[adapter_name].task_type)
        _move_into(staging, save_directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _convert_in_place(folder: str, plan: GoRAPlan, task_type) -> None:
    """PEFT's files in ``folder`` (the adapter for the offset base) replaced by the converted ones."""
    weights, saved_state = _saved_weights(folder, plan.rank_map)
    current = plan.with_adapters({name: (a.float(), b.float()) for name, (a, b) in weights.items()})
    current.saved_state = saved_state
    peft_config = _read_json(os.path.join(folder, CONFIG_FILE))
    converted = folder + ".converted"
    save_plan(current, converted, task_type=task_type)
    config_path = os.path.join(converted, CONFIG_FILE)
    config = _read_json(config_path)
    for key in ("base_model_name_or_path", "revision"):  # what PEFT knew of the base, kept
        if peft_config.get(key) is not None:
            config[key] = peft_config[key]
    with open(config_path, "w") as handle:
        json.dump(config, handle, indent=2)
    for name in os.listdir(converted):
        os.replace(os.path.join(converted, name), os.path.join(folder, name))
    os.rmdir(converted)


def _move_into(staging: str, destination: str) -> None:
    """Every staged file to its place in ``destination``, the weights of each folder before its configs."""
    for root, _dirs, files in os.walk(staging):
        target = os.path.join(destination, os.path.relpath(root, staging))
        os.makedirs(target, exist_ok=True)
        for name in sorted(files, key=lambda n: n != WEIGHTS_FILE):
            os.replace(os.path.join(root, name), os.path.join(target, name))


def _load_converted(self, model_id, adapter_name: str, *args, **kwargs):
    peft_load = type(self).load_adapter
    folder = os.path.join(str(model_id), kwargs.get("subfolder") or "")
    marker = os.path.join(folder, GORA_FILE)
    if not (os.path.isfile(marker) and _read_json(marker).get("converted_for_original_base")):
        return peft_load(self, model_id, adapter_name, *args, **kwargs)
    plans = self._gora_offset_plans
    if adapter_name not in plans:
        raise ValueError(f"load_adapter({folder!r}, {adapter_name!r}): the folder holds an adapter converted for the "
                         "original base; this model's base is offset for adapter(s) "
                         f"{sorted(plans)} only. Load it with PeftModel.from_pretrained on the original model")
    own = plans[adapter_name]
    saved = plan_from_converted(GoRAReport.from_dict(_read_json(marker)), *_saved_weights(folder, own.rank_map))
    _check_same_initial(saved, own, folder)
    inner = self.base_model.model
    with torch.no_grad():
        for name in saved.lora_a:
            layer = inner.get_submodule(name)
            write_full(layer.lora_A[adapter_name].weight, saved.lora_a[name])
            write_full(layer.lora_B[adapter_name].weight, saved.lora_b[name])
        for key, value in saved.saved_state.items():
            module_name, param_name = key.rsplit(".", 1)
            write_full(getattr(inner.get_submodule(module_name).modules_to_save[adapter_name], param_name), value)
    return None


def _check_same_initial(saved: GoRAPlan, own: GoRAPlan, folder: str) -> None:
    """The folder's A0/B0 must be the ones this model's base was offset with, else its trained halves
    belong to another base."""
    if saved.rank_map != own.rank_map:
        raise ValueError(f"{folder}: its rank map differs from this model's plan; it belongs to another run")
    for name in own.lora_a:
        for side, theirs, ours in (("A0", saved.initial(name)[0], own.initial(name)[0]),
                                   ("B0", saved.initial(name)[1], own.initial(name)[1])):
            if not torch.allclose(theirs.float(), ours.float().to(theirs.device), rtol=1e-4, atol=1e-6):
                raise ValueError(f"{folder}: {name}: its {side} differs from the one this model's base was offset "
                                 "with; the adapter was trained from another initialisation")


__all__ = ["keep_original_base_files"]
