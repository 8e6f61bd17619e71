"""Result files written so that a crash or a full disk never leaves a half-written one in place: the
content goes to a temporary file beside the target, is flushed to disk, then renamed over it."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable


def write_atomically(path: str, write: Callable) -> None:
    """``write(handle)`` into a temporary file in ``path``'s folder, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    try:
        with os.fdopen(handle, "w") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(staging, 0o644)
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise


def write_json(path: str, value) -> None:
    write_atomically(path, lambda stream: json.dump(value, stream, indent=2))


def read_json_mapping(handle, label: str, expected: str) -> dict:
    """A JSON object from an open file; invalid JSON names ``label`` (which file) with the parser's
    line and column, anything but an object says what ``expected`` was."""
    try:
        found = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{label}, line {error.lineno} column {error.colno}: invalid JSON ({error.msg})") from None
    if not isinstance(found, dict):
        raise ValueError(f"{label}: expected {expected}, got {type(found).__name__}")
    return found
