"""What a resume may change. A run resumed with other data, another split, seed, global batch,
max_length, task, targets or GoRA options would silently train something else than the run it
continues; those differences are refused (listed) unless the user says they mean them. The
learning rate, its schedule and the step count may change, and are named in the log."""

from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional, Tuple

SAME_RUN = ("model", "task", "data", "data_fingerprint", "eval_data", "prompt_field", "completion_field",
            "messages_field", "train_on_prompt", "skip_long", "train_examples", "eval_examples", "seed",
            "global_batch_size", "max_length", "quantization", "quant_storage", "gora")
"""Options that set the data order or the objective: a resume must keep them."""

MAY_CHANGE = ("steps", "lr", "lr_schedule", "warmup_ratio", "min_lr_ratio", "loraplus_lr_ratio", "weight_decay",
              "max_grad_norm", "precision")
"""Options a resume may change (named in the log)."""


def data_fingerprint(path: Optional[str]) -> Optional[str]:
    """sha256 of a data file's bytes, or of a folder's files (relative names and bytes, in order); None
    for a packaged data set named by its name."""
    if not path or not os.path.exists(path):
        return None
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    for file in files:
        if os.path.isdir(path):
            digest.update(os.path.relpath(file, path).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _flatten(record: dict, keys) -> dict:
    flat = {}
    for key in keys:
        if key not in record:
            continue
        value = record[key]
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": item for inner, item in value.items()})
        else:
            flat[key] = value
    return flat


def record_changes(saved: dict, current: dict) -> Tuple[List[str], List[str]]:
    """(refused, allowed): each a list of ``"option: X there, Y here"`` between a checkpoint's run
    record and this run's. An option the saved record lacks (an older checkpoint) is not compared."""
    current = json.loads(json.dumps(current))  # as the checkpoint stores it (tuples become lists)
    same_content = saved.get("data_fingerprint") and saved.get("data_fingerprint") == current.get("data_fingerprint")

    def differences(keys):
        before, after = _flatten(saved, keys), _flatten(current, keys)
        return [f"{key}: {before[key]!r} there, {after.get(key)!r} here" for key in sorted(before)
                if key in after and before[key] != after[key] and not (key == "data" and same_content)]

    return differences(SAME_RUN), differences(MAY_CHANGE)
