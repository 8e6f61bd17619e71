"""Loading a model so that no rank holds all of it.

- ZeRO-3: from a safetensors folder, the model is built inside ``deepspeed.zero.Init`` (each weight
  partitioned as it is created, not initialised) and each rank reads only the rows of each tensor
  that cover its flat partition. Otherwise transformers' own path: while an ``HfDeepSpeedConfig`` is
  alive, ``from_pretrained`` builds the model inside ``zero.Init`` and rank 0 reads the checkpoint
  (its whole file in memory) and scatters each tensor into the partitions.
- FSDP2: the model is built on the meta device, ``fully_shard``-ed, materialised as this rank's
  shards only, then filled. From a safetensors folder (one file or an index of several) each rank
  reads just its own rows of each tensor (``safe_open(...).get_slice``): no rank reads, holds or
  sends the whole model. Anything else (GGUF, ``.bin``, a new classification head, a checkpoint
  whose names need transformers' conversions, the random test models) goes through rank 0: it loads
  the model on the CPU and ``set_model_state_dict(broadcast_from_rank0=True)`` sends each rank its
  shards, so only rank 0's CPU memory ever holds the whole model, and only while loading.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from gora_dist.launcher.models import load_model, model_from_config, model_skeleton
from gora_dist.launcher.model_sources import TINY_MODELS, model_source


def keep_zero3_loading(ds_config: dict):
    """The object whose life makes transformers load (and build) models ZeRO-3 partitioned; keep it
    for the run (transformers holds it by a weak reference)."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def _checkpoint_tensors(model: nn.Module, files: Dict[str, str], names: Dict[str, str]):
    """(model tensor name, the model's tensor, the checkpoint's lazy slice, its shape, file), file by
    file, each file opened once."""
    from safetensors import safe_open

    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    by_file: Dict[str, list] = {}
    for name, key in names.items():
        by_file.setdefault(files[key], []).append((name, key))
    for path, entries in by_file.items():
        with safe_open(path, framework="pt") as handle:
            for name, key in entries:
                stored = handle.get_slice(key)
                yield name, tensors[name], stored, tuple(stored.get_shape()), path


@torch.no_grad()
def fill_own_partitions(model: nn.Module, files: Dict[str, str], names: Dict[str, str]) -> int:
    """Copy into each ZeRO-3 parameter's local partition (``ds_tensor``, DeepSpeed's even flat split)
    the rows of the checkpoint that cover it, and whole buffers; returns the elements read."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    rank, read = dist.get_rank(), 0
    for name, target, stored, shape, path in _checkpoint_tensors(model, files, names):
        full_shape = tuple(getattr(target, "ds_shape", target.shape))
        if shape != full_shape:
            raise ValueError(f"{path}: {names[name]} has shape {shape}, the model's {name} {full_shape}")
        if not hasattr(target, "ds_id"):  # a buffer: every rank holds it whole
            target.copy_(stored[...].to(target.dtype) if shape else stored[...])
            continue
        if target.ds_status != ZeroParamStatus.NOT_AVAILABLE:
            raise ValueError(f"{name}: a ZeRO-3 parameter gathered while loading; cannot fill its partition")
        numel, part = target.ds_numel, target.ds_tensor.numel()
        start, stop = min(rank * part, numel), min((rank + 1) * part, numel)
        if stop <= start:
            continue
        width = numel // shape[0] if shape else 1
        first, last = start // width, -(-stop // width)
        rows = (stored[first:last] if shape else stored[...]).reshape(-1)
        target.ds_tensor[:stop - start].copy_(rows[start - first * width:stop - first * width].to(target.ds_tensor.dtype))
        read += rows.numel()
    return read


def load_zero3(spec: str, ds_config: dict, say=print, **load_kwargs) -> nn.Module:
    """The model ``load_model(spec, **load_kwargs)`` would give, ZeRO-3 partitioned from the start.
    From a safetensors folder: built under ``deepspeed.zero.Init`` without initialising its weights,
    then each rank reads only the rows that cover its partitions; otherwise transformers' own ZeRO-3
    loading (rank 0 reads the checkpoint and scatters it). ``keep_zero3_loading`` must be alive."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights

    if spec in TINY_MODELS:  # the random test models are built whole, then partitioned by the engine
        return load_model(spec, **load_kwargs)
    files = safetensors_files(model_source(spec)[0])
    if files is None or load_kwargs.get("task") == "seq-cls":
        say(f"loading {spec} through transformers' ZeRO-3 path (rank 0 reads the checkpoint)")
        return load_model(spec, **load_kwargs)
    with no_init_weights():  # transformers builds under zero.Init while HfDeepSpeedConfig lives
        model = model_from_config(spec, **load_kwargs)
    if not all(hasattr(p, "ds_id") for p in model.parameters()):
        raise RuntimeError(f"{spec}: the model was not built under deepspeed.zero.Init (is keep_zero3_loading alive?)")
    names, missing = checkpoint_names(model, files)
    if missing:
        say(f"loading {spec} through transformers' ZeRO-3 path ({missing[0]} is not in the checkpoint)")
        del model
        return load_model(spec, **load_kwargs)
    read = fill_own_partitions(model, files, names)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    say(f"loaded {spec}: each rank read the rows covering its ZeRO-3 partitions ({read:,} of {total:,} elements)")
    model.config._name_or_path = spec
    return model.eval()


def safetensors_files(folder: str) -> Optional[Dict[str, str]]:
    """{tensor name: file} of a folder's safetensors checkpoint, or None when it has none."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as handle:
            weight_map = json.load(handle)["weight_map"]
        return {name: os.path.join(folder, file) for name, file in weight_map.items()}
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        return None
    from safetensors import safe_open

    with safe_open(single, framework="pt") as handle:
        return {name: single for name in handle.keys()}


def checkpoint_names(model: nn.Module, files: Dict[str, str]) -> Tuple[Dict[str, str], list]:
    """({model tensor name: checkpoint name}, [names the checkpoint lacks]) for the parameters and
    persistent buffers, allowing for a checkpoint saved with or without the base model's prefix."""
    prefix = getattr(model, "base_model_prefix", "")
    wanted = [name for name, _ in model.named_parameters()]
    persistent = set(model.state_dict().keys())
    wanted += [name for name, _ in model.named_buffers() if name in persistent]
    found, missing = {}, []
    for name in wanted:
        candidates = [name]
        if prefix:
            candidates += [name[len(prefix) + 1:]] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
        hit = next((candidate for candidate in candidates if candidate in files), None)
        if hit is None:
            missing.append(name)
        else:
            found[name] = hit
    return found, missing


def _own_rows(tensor: torch.Tensor, full_rows: int, rank: int, world: int) -> slice:
    """The rows of a (rows, ...) tensor that this rank's FSDP2 Shard(0) local tensor holds (all of
    them for a tensor FSDP does not shard)."""
    if not hasattr(tensor, "to_local"):
        return slice(0, full_rows)
    first = min(rank * -(-full_rows // world), full_rows)
    return slice(first, first + tensor.to_local().shape[0])


@torch.no_grad()
def fill_own_rows(model: nn.Module, files: Dict[str, str], names: Dict[str, str]) -> int:
    """Copy each tensor's rows that this rank owns from the safetensors files; returns the elements read."""
    rank, world, read = dist.get_rank(), dist.get_world_size(), 0
    for name, target, stored, shape, path in _checkpoint_tensors(model, files, names):
        if shape != tuple(target.shape):
            raise ValueError(f"{path}: {names[name]} has shape {shape}, the model's {name} {tuple(target.shape)}")
        local = target.to_local() if hasattr(target, "to_local") else target
        if not shape:
            local.copy_(stored[...])
            continue
        rows = _own_rows(target, shape[0], rank, world)
        if rows.stop > rows.start:
            values = stored[rows.start:rows.stop]
            local.copy_(values.to(local.dtype))
            read += values.numel()
    return read


def load_fsdp2(spec: str, shard: Callable[[nn.Module], None], device: torch.device, say=print, **load_kwargs) -> nn.Module:
    """The model ``load_model(spec, **load_kwargs)`` would give, FSDP2-sharded by ``shard`` (which
    calls ``fully_shard`` on blocks and root), with each rank holding only its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model = model_skeleton(spec, **load_kwargs)  # parameters on meta, buffers real
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    files = None if spec in TINY_MODELS else safetensors_files(model_source(spec)[0])
    names, missing = checkpoint_names(model, files) if files else ({}, ["(no safetensors file)"])
    direct = not missing and load_kwargs.get("task") != "seq-cls"  # seq-cls: a new head, from rank 0's seed
    full_state = {}
    if not direct and dist.get_rank() == 0:
        full_state = load_model(spec, **load_kwargs).state_dict()
    shard(model)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
    if direct:
        read = fill_own_rows(model, files, names)
        total = sum(tensor.numel() for tensor in model.state_dict().values())
        say(f"loaded {spec}: each rank read its own rows of the safetensors checkpoint ({read:,} of {total:,} elements)")
    else:
        set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        reason = f"{missing[0]} not in the checkpoint" if files else "not a safetensors folder"
        say(f"loaded {spec} on rank 0, which sent each rank its shards ({reason if missing else 'new head'})")
        full_state.clear()
    model.config._name_or_path = spec
    return model.eval()
