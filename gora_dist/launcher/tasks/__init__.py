"""The launcher's tasks, one module per kind: ``classification`` (label word or new head, accuracy)
and ``sft`` (prompt → response, generation and response NLL). :func:`build_task` picks one."""

from __future__ import annotations

from gora_dist.launcher.tasks.base import Task


def build_task(config, tokenizer) -> Task:
    """The task of ``config.task`` with its data read, checked and tokenized (no model, no process group)."""
    if config.task == "sft":
        from gora_dist.launcher.tasks.sft import SFTTask

        return SFTTask(config, tokenizer)
    from gora_dist.launcher.tasks.classification import ClassificationTask

    return ClassificationTask(config, tokenizer)


__all__ = ["Task", "build_task"]
