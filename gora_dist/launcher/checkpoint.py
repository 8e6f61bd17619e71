"""Checkpoints that survive kill -9 and load at any world size.

A checkpoint is a folder ``checkpoints/step-NNNNNN`` with the adapter in PEFT format (plus
``gora.json``: rank map, config, step), ``optimizer.safetensors`` (full AdamW moments per adapter
parameter, gathered through each engine's own API) and ``trainer_state.json``. Rank 0 writes it
into a temporary folder, fsyncs, renames it into place, then points ``checkpoints/latest`` at it
with an atomic replace: a crash at any moment leaves the previous checkpoint intact and ``latest``
naming a complete one. Only JSON and safetensors are read back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from gora_dist.model.adapter_io import give_usual_permissions, save_plan
from gora_dist.report import GoRAPlan

LATEST = "latest"


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(checkpoint_root(output_dir), f"step-{step:06d}")


def _fsync_tree(folder: str) -> None:
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def check_finite(plan: GoRAPlan, extra: Dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write ``what`` when one of its tensors holds NaN or infinity (naming the tensor): a
    file that cannot be trained on must never replace one that can."""
    named = [*(("lora_A of " + n, t) for n, t in plan.lora_a.items()), *(("lora_B of " + n, t) for n, t in plan.lora_b.items()),
             *plan.saved_state.items(), *extra.items()]
    for name, tensor in named:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{what}: {name} holds non-finite values; not written (the previous files are kept)")


def write_checkpoint(output_dir: str, step: int, plan: GoRAPlan, optimizer_state: Dict[str, torch.Tensor],
                     trainer_state: dict, keep: int = 2) -> str:
    """Rank 0 only. plan: the adapters' current A/B in a GoRAPlan (report carries rank map and config).
    Nothing is written when a value is not finite."""
    check_finite(plan, optimizer_state, f"checkpoint at step {step}")
    root = checkpoint_root(output_dir)
    os.makedirs(root, exist_ok=True)
    final = checkpoint_path(output_dir, step)
    staging = tempfile.mkdtemp(prefix=".tmp-step-", dir=root)
    try:
        adapter_dir = os.path.join(staging, "adapter")
        save_plan(plan, adapter_dir)
        save_file({key: value.contiguous() for key, value in optimizer_state.items()},
                  os.path.join(staging, "optimizer.safetensors"))
        with open(os.path.join(staging, "trainer_state.json"), "w") as handle:
            json.dump({**trainer_state, "step": step}, handle, indent=2)
        _fsync_tree(staging)
        if os.path.exists(final):
            shutil.rmtree(final)
        give_usual_permissions(staging)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    pointer = os.path.join(root, f".{LATEST}.tmp")
    with open(pointer, "w") as handle:
        handle.write(os.path.basename(final))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(pointer, os.path.join(root, LATEST))
    _prune(root, keep, keep_name=os.path.basename(final), run_id=trainer_state.get("run_id"))
    return final


def run_id_of(folder: str) -> Optional[str]:
    """The run id a checkpoint folder was written by (None: unreadable, or from before run ids)."""
    try:
        with open(os.path.join(folder, "trainer_state.json")) as handle:
            return json.load(handle).get("run_id")
    except (OSError, ValueError):
        return None


def _prune(root: str, keep: int, keep_name: str, run_id: Optional[str]) -> None:
    """Keep the newest ``keep`` checkpoints of this run (another run's are never counted or removed)."""
    steps = sorted(name for name in os.listdir(root) if name.startswith("step-")
                   and run_id_of(os.path.join(root, name)) == run_id)
    for name in steps[:-keep] if keep > 0 else []:
        if name != keep_name:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    for name in os.listdir(root):  # staging folders of writes that were killed
        if name.startswith(".tmp-step-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    pointer = os.path.join(checkpoint_root(output_dir), LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as handle:
        path = os.path.join(checkpoint_root(output_dir), handle.read().strip())
    return path if os.path.isdir(path) else None


class DamagedCheckpoint(ValueError):
    """A checkpoint file that cannot be read; the message names the file."""


def _read(path: str, reader):
    try:
        return reader(path)
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{path} is missing") from None
    except Exception as error:  # safetensors' and json's errors: a torn or damaged file
        raise DamagedCheckpoint(f"{path} cannot be read ({type(error).__name__}: {error})") from None


def _read_json(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


def read_checkpoint(path: str) -> Tuple[dict, Dict[str, Tuple[torch.Tensor, torch.Tensor]], Dict[str, torch.Tensor], dict]:
    """(gora.json, {module: (A, B)}, optimizer tensors, trainer_state); trainer_state["saved_state"]
    holds the full weights of modules_to_save ({"classifier.weight": ...}). A file that cannot be
    read raises :class:`DamagedCheckpoint` naming it."""
    adapter_dir = os.path.join(path, "adapter")
    gora = _read(os.path.join(adapter_dir, "gora.json"), _read_json)
    tensors = _read(os.path.join(adapter_dir, "adapter_model.safetensors"), load_file)
    weights = {}
    for name, rank in gora["rank_map"].items():
        if rank:
            keys = (f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight")
            if any(key not in tensors for key in keys):
                raise DamagedCheckpoint(f"{adapter_dir}/adapter_model.safetensors lacks {name}'s adapter")
            weights[name] = (tensors[keys[0]], tensors[keys[1]])
    optimizer = _read(os.path.join(path, "optimizer.safetensors"), load_file)
    state = _read(os.path.join(path, "trainer_state.json"), _read_json)
    state["saved_state"] = {key[len("base_model.model."):]: value for key, value in tensors.items() if ".lora_" not in key}
    return gora, weights, optimizer, state


def newest_readable_checkpoint(output_dir: str, warn) -> Optional[Tuple[str, tuple]]:
    """(folder, read_checkpoint's tuple) of the newest checkpoint that reads whole: ``latest`` first,
    then the others from the newest step down; each damaged one is reported through ``warn``."""
    root = checkpoint_root(output_dir)
    latest = latest_checkpoint(output_dir)
    others = sorted((name for name in (os.listdir(root) if os.path.isdir(root) else []) if name.startswith("step-")),
                    reverse=True)
    candidates = ([latest] if latest else []) + [os.path.join(root, name) for name in others
                                                 if os.path.join(root, name) != latest]
    for path in candidates:
        try:
            return path, read_checkpoint(path)
        except DamagedCheckpoint as error:
            warn(f"warning: checkpoint {os.path.basename(path)} is damaged ({error}); trying the one before it")
    return None
