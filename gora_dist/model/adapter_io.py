"""Adapters on disk: PEFT's LoRA format (loads with ``PeftModel.from_pretrained``), a single-rank
export for servers that ignore ``rank_pattern``, and our own loader. Only JSON and safetensors are
read or written: loading never unpickles.

PEFT layout: ``adapter_config.json`` (``rank_pattern`` per module, ``use_rslora`` so the scale is
α/√r per layer) and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r).
``gora.json`` beside them holds the rank map, importances, the config and the versions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from importlib import metadata
from typing import Dict, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from gora_dist.config import OFFSET_INITIALIZERS
from gora_dist.method.initialization import rslora_scaling
from gora_dist.model.converted_adapter import converted_for_original_base, plan_from_converted
from gora_dist.model.layers import GoRALinear, gora_modules, install_adapters
from gora_dist.model.targets import saved_modules
from gora_dist.report import GoRAReport

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
GORA_FILE = "gora.json"
PEFT_PREFIX = "base_model.model."
FORMAT_VERSION = 1


def _versions() -> Dict[str, Optional[str]]:
    found = {}
    for package in ("gora_dist", "torch", "transformers", "peft", "safetensors"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def peft_task_type(model: nn.Module) -> Optional[str]:
    """PEFT's task type from the model class, so ``PeftModel.from_pretrained`` picks the right wrapper."""
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForConditionalGeneration") or name.endswith("ForSeq2SeqLM"):
        return "SEQ_2_SEQ_LM"
    return None


def _base_model_name(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None


def _peft_config(model, *, ranks, alpha, use_rslora, dropout, task_type, rank_pattern=True, modules_to_save=()) -> dict:
    """adapter_config.json for PEFT's LoraConfig. Keys of rank_pattern are regexes: escape the names."""
    return {
        "peft_type": "LORA",
        "task_type": task_type if task_type is not None else peft_task_type(model),
        "base_model_name_or_path": _base_model_name(model),
        "r": max(ranks.values()),
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "target_modules": list(ranks),
        "rank_pattern": {re.escape(name): rank for name, rank in ranks.items()} if rank_pattern else {},
        "alpha_pattern": {},
        "lora_dropout": dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": list(modules_to_save) or None,
        "use_dora": False,
    }


def give_usual_permissions(folder: str) -> None:
    """mkdtemp makes 0700 folders; a folder renamed into place should read like any other (umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)


def _write_atomically(directory: str, files: Dict[str, object]) -> None:
    """Write every file into a temporary folder first, then move each into place (gora.json last).

    A crash mid-write leaves either the old file or the new one at each path, never a torn one.
    """
    directory = os.path.abspath(directory)
    os.makedirs(os.path.dirname(directory) or ".", exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".gora-tmp-", dir=os.path.dirname(directory) or ".")
    try:
        for filename, content in files.items():
            path = os.path.join(staging, filename)
            if isinstance(content, dict) and filename.endswith(".safetensors"):
                save_file(content, path, metadata={"format": "pt"})
            else:
                with open(path, "w") as handle:
                    json.dump(content, handle, indent=2, sort_keys=False)
                    handle.write("\n")
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if not os.path.exists(directory):
            give_usual_permissions(staging)
            os.replace(staging, directory)
            return
        ordered = sorted(files, key=lambda filename: filename == GORA_FILE)
        for filename in ordered:
            os.replace(os.path.join(staging, filename), os.path.join(directory, filename))
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)


def _adapters_or_error(model: nn.Module) -> Dict[str, GoRALinear]:
    adapters = dict(gora_modules(model))
    if not adapters:
        raise ValueError("the model has no GoRA adapters: run apply_gora (or load_adapter) first")
    return adapters


def _gora_metadata(ranks: Dict[str, int], scaling: Dict[str, float], report: Optional[GoRAReport], export: str) -> dict:
    data = report.to_dict() if report is not None else {"rank_map": dict(ranks)}
    data.update({"format_version": FORMAT_VERSION, "export": export, "versions": _versions(), "scaling": scaling})
    return data


def peft_adapter_folder(root: str, adapter_name: Optional[str]) -> str:
    """Where PEFT's ``save_pretrained(root)`` puts adapter ``adapter_name``: ``default`` (or None) at
    the top, any other in its own subfolder."""
    return root if adapter_name in (None, "default") else os.path.join(root, adapter_name)


def write_plan_metadata(folder: str, report: GoRAReport) -> None:
    """gora.json (the report, as ``save_plan`` writes it) beside a PEFT adapter another writer saved
    in ``folder``: the plan ``load_plan`` reads back with that adapter's weights."""
    scaling = {name: rslora_scaling(report.config.alpha, rank, report.config.use_rslora)
               for name, rank in report.rank_map.items() if rank > 0}
    path = os.path.join(folder, GORA_FILE)
    staged = path + ".tmp"
    with open(staged, "w") as handle:
        json.dump(_gora_metadata(report.rank_map, scaling, report, "peft"), handle, indent=2)
    os.replace(staged, path)


def _write_peft_adapter(path, model, weights, *, alpha, use_rslora, dropout, report, task_type,
                        modules_to_save=(), saved_state=None, initial=None) -> None:
    """weights: {module name: (A (r, in), B (out, r))}; saved_state: {"<module>.<param>": tensor} of
    modules_to_save. ``model`` only informs the task type and base name. With an initializer that
    offsets the base, ``initial`` ({module: (A0, B0)}) makes the written adapter the converted one."""
    converted = report is not None and report.config.initializer in OFFSET_INITIALIZERS
    if converted:
        weights, alpha = converted_for_original_base(weights, initial or {}, alpha, use_rslora)
    ranks = {name: lora_a.shape[0] for name, (lora_a, _) in weights.items()}
    tensors = {f"{PEFT_PREFIX}{key}": value.detach().to("cpu", copy=True).contiguous()
               for key, value in (saved_state or {}).items()}
    for name, (lora_a, lora_b) in weights.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora_a.detach().to("cpu", copy=True).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora_b.detach().to("cpu", copy=True).contiguous()
    scaling = {name: rslora_scaling(alpha, rank, use_rslora) for name, rank in ranks.items()}
    config = _peft_config(model, ranks=ranks, alpha=alpha, use_rslora=use_rslora, dropout=dropout, task_type=task_type,
                          modules_to_save=modules_to_save)
    metadata = _gora_metadata(ranks, scaling, report, "peft")
    if converted:
        metadata["converted_for_original_base"] = True  # load_plan splits [A; A0], [B, -B0] back
    _write_atomically(path, {WEIGHTS_FILE: tensors, CONFIG_FILE: config, GORA_FILE: metadata})


def save_adapter(model: nn.Module, path: str, report: Optional[GoRAReport] = None, *, task_type: Optional[str] = None) -> None:
    """Write the model's adapters in PEFT's LoRA format plus ``gora.json``.

    All adapters must share α, rsLoRA and dropout (they do when made by one ``apply_gora``).
    """
    adapters = _adapters_or_error(model)
    settings = {(m.alpha, m.use_rslora, getattr(m.dropout, "p", 0.0)) for m in adapters.values()}
    if len(settings) != 1:
        raise ValueError(f"adapters differ in (alpha, use_rslora, dropout): {sorted(settings)}; PEFT's format has one")
    alpha, use_rslora, dropout = settings.pop()
    weights = {name: (module.lora_A, module.lora_B) for name, module in adapters.items()}
    names = report.config.modules_to_save if report is not None else ()
    saved_state = {key: p.detach() for key, p in model.named_parameters()
                   if key.startswith(tuple(f"{m}." for m in saved_modules(model, names)))} if names else {}
    initial = {name: module.initial_factors for name, module in adapters.items() if hasattr(module, "initial_factors")}
    _write_peft_adapter(path, model, weights, alpha=alpha, use_rslora=use_rslora, dropout=dropout,
                        report=report, task_type=task_type, modules_to_save=names, saved_state=saved_state,
                        initial=initial)


def save_plan(plan, path: str, model: Optional[nn.Module] = None, *, task_type: Optional[str] = None) -> None:
    """Write a GoRAPlan's initial adapters (A0, B0) in PEFT's format without needing the model's
    weights: for sharded runs, where no rank holds the full model. ``model`` (optional) names the
    task type and base model in ``adapter_config.json``."""
    config = plan.report.config
    weights = {name: (plan.lora_a[name], plan.lora_b[name]) for name in plan.lora_a}
    _write_peft_adapter(path, model, weights, alpha=config.alpha, use_rslora=config.use_rslora,
                        dropout=config.dropout, report=plan.report, task_type=task_type,
                        modules_to_save=config.modules_to_save, saved_state=plan.saved_state,
                        initial={name: plan.initial(name) for name in plan.lora_a})


def save_uniform_adapter(
    model: nn.Module, path: str, report: Optional[GoRAReport] = None, *, pad_to_max_rank: bool = False,
    task_type: Optional[str] = None,
) -> None:
    """Export for servers that read one ``r`` and one ``lora_alpha`` (vLLM, SGLang, LoRAX).

    Each layer's scale s_i is folded into its B (B' = s_i·B), and the config says r = lora_alpha =
    max rank with rsLoRA off, so any reader's global scale α/r is exactly 1. With
    ``pad_to_max_rank`` every A gets zero rows and every B zero columns up to the max rank (for
    servers that need one shape); the zeros change no output.
    """
    adapters = _adapters_or_error(model)
    max_rank = max(module.rank for module in adapters.values())
    tensors = {}
    for name, module in adapters.items():
        lora_a = module.lora_A.detach().to("cpu", torch.float32)
        lora_b = module.lora_B.detach().to("cpu", torch.float32) * module.scaling
        if pad_to_max_rank and module.rank < max_rank:
            lora_a = torch.cat([lora_a, lora_a.new_zeros(max_rank - module.rank, lora_a.shape[1])], dim=0)
            lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], max_rank - module.rank)], dim=1)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora_b.contiguous()
    ranks = {name: max_rank for name in adapters}
    config = _peft_config(
        model, ranks=ranks, alpha=float(max_rank), use_rslora=False, dropout=0.0, task_type=task_type, rank_pattern=False
    )
    scaling = {name: 1.0 for name in adapters}
    _write_atomically(path, {
        WEIGHTS_FILE: tensors, CONFIG_FILE: config, GORA_FILE: _gora_metadata(ranks, scaling, report, "uniform"),
    })


def _read_json(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


def _saved_weights(path: str, rank_map: Dict[str, int]):
    """({name: (A, B)}, {"<module>.<param>": tensor} of modules_to_save) from an adapter folder; a
    layer of the rank map without both tensors is named."""
    tensors = load_file(os.path.join(path, WEIGHTS_FILE))
    weights = {}
    for name, rank in rank_map.items():
        if rank == 0:
            continue
        keys = (f"{PEFT_PREFIX}{name}.lora_A.weight", f"{PEFT_PREFIX}{name}.lora_B.weight")
        missing = [key for key in keys if key not in tensors]
        if missing:
            raise ValueError(f"{name}: {WEIGHTS_FILE} in {path} lacks {missing}")
        weights[name] = (tensors[keys[0]], tensors[keys[1]])
    saved_state = {key[len(PEFT_PREFIX):]: value for key, value in tensors.items() if ".lora_" not in key}
    return weights, saved_state


def load_plan(path: str):
    """The ``GoRAPlan`` an adapter folder holds (written by ``save_plan`` or by ``save_adapter`` with
    its report): the rank map, the config, and the saved A/B (the initial ones, or trained ones from a
    later checkpoint). With ``apply_plan`` or ``to_peft`` it goes into a model as loaded."""
    from gora_dist.report import GoRAPlan

    gora = _read_json(os.path.join(path, GORA_FILE))
    if "layers" not in gora or "config" not in gora:
        raise ValueError(f"{os.path.join(path, GORA_FILE)} has no report (layers, config): it was saved without one, "
                         "so there is no plan to read back; use load_adapter")
    weights, saved_state = _saved_weights(path, gora["rank_map"])
    report = GoRAReport.from_dict(gora)
    if not gora.get("converted_for_original_base"):
        return GoRAPlan(report, {name: a.float() for name, (a, _) in weights.items()},
                        {name: b.float() for name, (_, b) in weights.items()}, saved_state)
    return plan_from_converted(report, weights, saved_state)


def load_adapter(model: nn.Module, path: str) -> Optional[GoRAReport]:
    """Put the adapters saved by :func:`save_adapter` into a fresh base model (in place).

    Returns the saved report when there is one. Errors name the module that is missing or whose
    shape differs, and leave the model untouched.
    """
    gora = _read_json(os.path.join(path, GORA_FILE))
    if gora.get("export") != "peft":
        raise ValueError(f"{path} holds a {gora.get('export')!r} export; load_adapter reads the PEFT export of save_adapter")
    peft_config = _read_json(os.path.join(path, CONFIG_FILE))
    weights, saved_state = _saved_weights(path, gora["rank_map"])
    modules_to_save = peft_config.get("modules_to_save") or ()
    install_adapters(model, weights, alpha=peft_config["lora_alpha"], use_rslora=peft_config.get("use_rslora", False),
                     dropout=peft_config.get("lora_dropout", 0.0), modules_to_save=modules_to_save,
                     saved_state=saved_state)
    return GoRAReport.from_dict(gora) if "layers" in gora else None
