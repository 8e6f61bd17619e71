"""What a person watching a long run reads: one line per optimizer step in ``train_log.jsonl`` (and
evaluations in the same file), the same values to TensorBoard or W&B when asked, and the counts the
lines are made of. Only rank 0 writes; the counts are summed over ranks by the loop."""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Optional, Tuple

import torch

LOG_NAME = "train_log.jsonl"


def example_lengths(batch: dict) -> torch.Tensor:
    """The real length of each example: a padded row's mask sum, or in a padding-free row the runs
    between the positions where ``position_ids`` restarts at 0."""
    mask, positions = batch.get("attention_mask"), batch.get("position_ids")
    if mask is not None:
        return mask.sum(-1).flatten()
    if positions is not None:
        flat = positions.flatten()
        starts = torch.nonzero(flat == 0).flatten().tolist() + [flat.numel()]
        return torch.tensor([end - start for start, end in zip(starts, starts[1:])])
    ids = batch["input_ids"]
    return torch.full((ids.shape[0],), ids.shape[-1])


def batch_counts(batch: dict) -> Tuple[int, int, int, int]:
    """(positions computed, padding included; positions that are not padding; positions whose
    prediction the loss counts; Σ n² over the examples' real lengths n, for attention's FLOPs).
    Token labels are shifted by one (position t predicts label t + 1); a label per example
    (sequence classification) counts once per example."""
    ids = batch["input_ids"]
    lengths = example_lengths(batch)
    real = int(lengths.sum())
    labels = batch.get("labels")
    if labels is None:
        trained = 0
    elif labels.dim() >= 2:
        trained = int((labels[..., 1:] != -100).sum())
    else:
        trained = int((labels != -100).sum())
    return ids.numel(), real, trained, int((lengths.long() ** 2).sum())


def peak_memory_gb(device: torch.device) -> Tuple[float, str]:
    """(GB, what was measured): ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the process's
    peak resident set (``ru_maxrss``: the torch runtime included, freed buffers glibc kept counted)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_memory_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024) / 2**30, "cpu_peak_rss"


def check_reporter(report_to: str) -> None:
    """Refuse a reporter whose package is missing before anything starts."""
    needed = {"tensorboard": ("tensorboard", "pip install tensorboard (or gora-dist[tensorboard])"),
              "wandb": ("wandb", "pip install wandb (or gora-dist[wandb]); it runs offline here")}.get(report_to)
    if needed is not None:
        import importlib.util

        if importlib.util.find_spec(needed[0]) is None:
            raise ValueError(f"report_to={report_to} needs its package: {needed[1]}")


class StepLog:
    """train_log.jsonl plus the reporter, on rank 0 (every method is a no-op elsewhere). A resumed
    run keeps the lines up to the step it resumes from and drops any later ones (written by the
    interrupted run after its last checkpoint)."""

    def __init__(self, output_dir: str, report_to: str, main: bool, start_step: int, run_config: dict) -> None:
        self.main, self.writer, self.wandb = main, None, None
        self.path = os.path.join(output_dir, LOG_NAME)
        if not main:
            return
        os.makedirs(output_dir, exist_ok=True)
        kept = []
        if start_step > 0 and os.path.exists(self.path):
            with open(self.path) as handle:
                kept = [line for line in handle if line.strip() and json.loads(line).get("step", 0) <= start_step]
        with open(self.path, "w") as handle:
            handle.writelines(kept)
        self.handle = open(self.path, "a")
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1)
        elif report_to == "wandb":
            import wandb

            mode = os.environ.get("WANDB_MODE", "offline")
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "gora_dist"), dir=output_dir, mode=mode,
                                    config=run_config, resume="allow")

    def write(self, record: dict, prefix: str = "train") -> None:
        """One line (a step's or an evaluation's, with its ``step``) and its numbers to the reporter."""
        if not self.main:
            return
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        numbers = {key: value for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{key}": value for key, value in numbers.items()}, step=record["step"])

    def close(self) -> None:
        if not self.main:
            return
        self.handle.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_log(output_dir: str, kind: Optional[str] = None) -> list:
    """The records of train_log.jsonl (``kind``: "step" or "eval" only)."""
    with open(os.path.join(output_dir, LOG_NAME)) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]
