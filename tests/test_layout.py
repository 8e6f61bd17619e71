"""The package's layers (docs/design.md): each module imports only its own layer and those above it,
the formulas never touch torch.distributed, DeepSpeed is imported where the design says, and no
module grows past a reader's head. Read from the source (ast), so lazy imports count too."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "gora_dist")

# the layer of each top-level part of gora_dist; a module may import from layers <= its own
LAYERS = {"config": 0, "report": 0, "memory_trace": 0, "method": 1, "kernels": 2, "comm": 2, "model": 3,
          "engines": 4, "pipeline": 5, "integrations": 6, "launcher": 7}
DEEPSPEED_ALLOWED = ("gora_dist/engines/deepspeed_zero.py", "gora_dist/comm/gather.py", "gora_dist/launcher/")
MAX_LINES = 300


def modules():
    """(path relative to the root, its part of gora_dist) for every module of the package, and kernels/."""
    found = []
    for base, part_of in ((PACKAGE, None), (os.path.join(ROOT, "kernels"), "kernels")):
        for folder, _, files in os.walk(base):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.relpath(os.path.join(folder, name), ROOT)
                    parts = os.path.relpath(os.path.join(folder, name), base)[:-3].split(os.sep)
                    found.append((path, part_of or parts[0]))
    return found


def imported_modules(path: str):
    """Every module named by an import statement in the file, relative imports resolved."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    package = path[:-3].replace(os.sep, ".").replace("kernels.", "gora_dist.kernels.", 1).split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            yield ".".join(base + ([node.module] if node.module else []))


def part_of(module: str):
    parts = module.split(".")
    if parts[0] != "gora_dist" or len(parts) < 2:
        return None
    return parts[1]


@pytest.mark.parametrize("path, part", [m for m in modules() if m[1] in LAYERS])
def test_each_module_imports_only_its_layer_and_those_above(path, part):
    wrong = [m for m in imported_modules(path) if part_of(m) in LAYERS and LAYERS[part_of(m)] > LAYERS[part]]
    assert not wrong, f"{path} (layer {part}) imports {wrong} from a later layer"


def test_the_formulas_never_see_torch_distributed_and_deepspeed_stays_where_the_design_says():
    for path, part in modules():
        imported = list(imported_modules(path))
        if part == "method":
            assert not [m for m in imported if m.startswith("torch.distributed")], path
        if any(m == "deepspeed" or m.startswith("deepspeed.") for m in imported):
            assert path.startswith(DEEPSPEED_ALLOWED), f"{path} imports deepspeed"


def test_no_module_of_the_package_grows_past_a_readers_head():
    long = {path: n for path, _ in modules() if path.startswith("gora_dist")
            for n in [sum(1 for _ in open(os.path.join(ROOT, path)))] if n > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"
