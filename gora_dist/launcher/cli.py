"""``launch/train.py`` as a command: ``--help`` lists every option with its docstring; a user error
(a bad option, value, data file or model folder) prints one message and exits 2, a step that is not
finite exits 1, a run stopped by SIGTERM/SIGUSR1 after its checkpoint exits 75. ``GORA_DEBUG=1``
shows the traceback."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import sys
import textwrap
from typing import Dict, List, Optional

from gora_dist.config import GoRAConfig
from gora_dist.launcher.config import TrainConfig
from gora_dist.launcher.gradients import NonFiniteStep
from gora_dist.launcher.preemption import PREEMPTED_EXIT, Preempted

USER_ERROR_EXIT = 2
USAGE = ("usage: launch/train.py [config.yaml|json] [--option value | --flag]...\n"
         "       torchrun --nproc_per_node N launch/train.py ...   |   deepspeed --num_gpus N launch/train.py ...\n")


def field_docs(cls) -> Dict[str, str]:
    """{field: the docstring under it in the class body} (the source is the documentation)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = after.value.value if isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None),
                                                                                   ast.Constant) else ""
            docs[node.target.id] = " ".join(str(text).split())
    return docs


def help_text() -> str:
    lines = [USAGE, "Options (default in brackets):"]
    for prefix, cls, skip in (("", TrainConfig, {"gora"}), ("gora.", GoRAConfig, set())):
        docs = field_docs(cls)
        defaults = cls()
        if prefix:
            lines.append("\nGoRA's options (--gora.<field>; the launcher's defaults: rank_ref 8, ranks 4-32, alpha 16, "
                         "gamma 0.05, grad_steps 8, target_modules auto):")
        for field in dataclasses.fields(cls):
            if field.name in skip:
                continue
            flag = f"--{prefix}{field.name.replace('_', '-') if not prefix else field.name}"
            value = getattr(defaults, field.name)
            lines.append(f"  {flag} [{value}]")
            if docs.get(field.name):
                lines.extend("      " + line for line in textwrap.wrap(docs[field.name], 94, break_on_hyphens=False))
    return "\n".join(lines) + "\n"


def cli(argv: Optional[List[str]] = None) -> int:
    """The command's exit status (0 done, 1 stopped on a non-finite step, 2 user error, 75 preempted)."""
    from gora_dist.launcher.runner import main

    arguments = sys.argv[1:] if argv is None else list(argv)
    if any(token in ("--help", "-h") for token in arguments):
        sys.stdout.write(help_text())
        return 0
    debug = os.environ.get("GORA_DEBUG", "") not in ("", "0")
    try:
        return main(arguments)
    except Preempted as stop:
        _say(str(stop))
        return PREEMPTED_EXIT
    except NonFiniteStep as error:
        if debug:
            raise
        _say(f"error: {error}")
        return 1
    except (ValueError, FileNotFoundError) as error:
        if debug:
            raise
        _say(f"error: {error}\n(GORA_DEBUG=1 shows where; launch/train.py --help lists the options)")
        return USER_ERROR_EXIT


def _say(message: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = os.environ.get("RANK", "0")
    if world > 1 and rank != "0" and not message.startswith("error"):
        return  # rank 0 says how the run stopped; an error is said by every rank that found it
    prefix = f"[rank {rank}] " if world > 1 else ""
    print(prefix + message, file=sys.stderr, flush=True)
