"""The DeepSpeed config a user hands the launcher (``--ds-config``): read with the file and line
named on a parse error, and checked against the run (only the zero engines read it; clipping is
the launcher's one rule) before any process group starts."""

from __future__ import annotations

import os

from gora_dist.launcher.files import read_json_mapping


def read_ds_config(path: str) -> dict:
    """A DeepSpeed JSON config; a missing file or invalid JSON named with the parser's line."""
    if not os.path.isfile(path):
        raise ValueError(f"ds_config={path!r}: no such file")
    with open(path) as handle:
        return read_json_mapping(handle, f"ds_config {path}", "a JSON object")


def check_ds_config(found: dict, config) -> None:
    """A DeepSpeed config only where DeepSpeed runs, and no clipping of its own that differs from
    max_grad_norm (the one rule of every engine)."""
    if config.engine in ("local", "ddp", "fsdp2"):
        raise ValueError(f"ds_config={config.ds_config!r} with engine={config.engine}: only the zero engines read "
                         "it; drop --ds-config or use --engine zero3/zero2")
    clipping = found.get("gradient_clipping")
    if clipping not in (None, "auto") and float(clipping) != config.max_grad_norm:
        raise ValueError(f"ds_config {config.ds_config}: gradient_clipping={clipping} differs from "
                         f"max_grad_norm={config.max_grad_norm}; the launcher clips every engine by --max-grad-norm "
                         f"(0 turns it off): pass --max-grad-norm {clipping}, or drop gradient_clipping from the file")
