"""The launcher's command line: a YAML/JSON config file, then ``--key value`` overrides (GoRA's
options as ``--gora.<field>``), into one TrainConfig. Unknown keys are an error that suggests the
closest known one; a file that does not parse is named with its line."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from typing import Any, Dict, List

from gora_dist.config import GoRAConfig
from gora_dist.launcher.files import read_json_mapping
from gora_dist.launcher.config import DEFAULT_GORA, TARGET_RULES, TrainConfig


def _known_keys() -> List[str]:
    top = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "gora"]
    return top + [f"gora.{f.name}" for f in dataclasses.fields(GoRAConfig)]


def _unknown(key: str) -> ValueError:
    close = difflib.get_close_matches(key, _known_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known options: {sorted(_known_keys())}"
    return ValueError(f"unknown option {key!r}{hint}")


def _parse_value(text: str, current: Any) -> Any:
    """A command-line string as the type of the option it sets (JSON for lists, dicts, numbers)."""
    if isinstance(current, bool) or current is None and text.lower() in ("true", "false"):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if isinstance(current, str) or current is None:
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text.split(",") if isinstance(current, (list, tuple)) else text
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    return value


def _read_file(path: str) -> dict:
    """A YAML or JSON config file; a parse error names the file and the parser's line."""
    with open(path) as handle:
        if path.endswith((".yaml", ".yml")):
            import yaml

            try:
                found = yaml.safe_load(handle) or {}
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
                raise ValueError(f"config file {path}{where}: invalid YAML ({getattr(error, 'problem', None) or error})") \
                    from None
        else:
            return read_json_mapping(handle, f"config file {path}", "a mapping of options")
    if not isinstance(found, dict):
        raise ValueError(f"config file {path}: expected a mapping of options, got {type(found).__name__}")
    return found


def load_config(argv: List[str]) -> TrainConfig:
    """``[config.yaml|json] [--key value | --flag]...`` -> TrainConfig. Flags without a value are true;
    GoRA's options become a GoRAConfig here, checked with its own messages."""
    values: Dict[str, Any] = {}
    gora: Dict[str, Any] = dict(DEFAULT_GORA)
    arguments = list(argv)
    if arguments and not arguments[0].startswith("--"):
        path = arguments.pop(0)
        if not os.path.exists(path):
            raise ValueError(f"config file {path!r} does not exist")
        for key, value in _read_file(path).items():
            if key == "gora":
                for gora_key, gora_value in value.items():
                    _check_key(f"gora.{gora_key}")
                    gora[gora_key] = gora_value
            else:
                _check_key(key)
                values[key] = value
    defaults = TrainConfig()
    index = 0
    while index < len(arguments):
        token = arguments[index]
        if not token.startswith("--"):
            raise ValueError(f"expected --option, got {token!r}")
        key = token[2:].replace("-", "_")
        if "=" in key:
            key, text = key.split("=", 1)
            index += 1
        elif index + 1 < len(arguments) and not arguments[index + 1].startswith("--"):
            text = arguments[index + 1]
            index += 2
        else:
            text = "true"
            index += 1
        _check_key(key)
        if key.startswith("gora."):
            field_name = key[5:]
            if field_name == "target_modules" and text in TARGET_RULES:
                gora[field_name] = text
            elif field_name in ("target_modules", "modules_to_save"):  # a JSON list, or names split on commas
                gora[field_name] = json.loads(text) if text.startswith("[") else text.split(",")
            else:
                gora[field_name] = _parse_value(text, gora.get(field_name, getattr(GoRAConfig(), field_name)))
        else:
            values[key] = _parse_value(text, getattr(defaults, key))
    if "steps" in values and values.get("epochs"):
        raise ValueError(f"steps={values['steps']} and epochs={values['epochs']}: give one of them")
    return TrainConfig(**values, gora=GoRAConfig.from_dict({"seed": values.get("seed", defaults.seed), **gora}))


def _check_key(key: str) -> None:
    if key.replace("-", "_") not in _known_keys():
        raise _unknown(key)
