"""The run's processes: which engine, this process's rank and device, the process group (started
for the run and destroyed at its end whatever happens), and how each global batch splits over the
ranks. Later stages ask :class:`Setup`, never the environment."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from datetime import timedelta
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from gora_dist.engines.choice import choose_engine
from gora_dist.launcher.config import TrainConfig
from gora_dist.launcher.ds_config import read_ds_config
from gora_dist.launcher.quantization import quantization_refusal
from gora_dist.memory_trace import write_now as write_memory_trace


@dataclasses.dataclass(frozen=True)
class Setup:
    """This process in the run. Each optimizer step takes one global batch: ``accumulation``
    micro-batches of ``micro`` examples on each of ``world`` ranks."""

    engine: str
    rank: int
    world: int
    device: torch.device
    micro: int
    accumulation: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, *args, **kwargs) -> None:
        """print, on rank 0 only (every rank runs the same code)."""
        if self.main:
            print(*args, **kwargs)

    def progress(self, iterable, **kwargs):
        """A tqdm bar over ``iterable`` on rank 0; the iterable itself elsewhere."""
        if not self.main:
            return iterable
        from tqdm import tqdm

        return tqdm(iterable, **kwargs)


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def strip_launcher_arguments(argv: List[str]) -> Tuple[List[str], bool]:
    """The deepspeed launcher appends ``--local_rank=N``: drop it, and remember who launched us
    (engine auto means ZeRO-3 under it)."""
    kept = [a for a in argv if not a.startswith("--local_rank")]
    return kept, len(kept) != len(argv)


def resolve_precision(config: TrainConfig) -> TrainConfig:
    """precision auto -> bf16 on GPUs, fp32 on the CPU; on GPUs float32 matmuls may use TF32."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if config.precision != "auto":
        return config
    return dataclasses.replace(config, precision="bf16" if torch.cuda.is_available() else "fp32")


@contextlib.contextmanager
def started_processes(config: TrainConfig, by_deepspeed: bool) -> Iterator[Setup]:
    """This process's Setup, its process group started if the engine needs one. At the end, even
    after an error, the memory trace is written and the group destroyed."""
    engine, device = _engine_and_device(config, by_deepspeed)
    if engine != "local":
        _start_group(engine, config, device)
    try:
        rank, world = (dist.get_rank(), dist.get_world_size()) if engine != "local" else (0, 1)
        micro, accumulation = _batch_split(config, world)
        yield Setup(engine, rank, world, device, micro, accumulation)
    finally:
        write_memory_trace()
        if dist.is_initialized():
            dist.destroy_process_group()


def _engine_and_device(config: TrainConfig, by_deepspeed: bool) -> Tuple[str, torch.device]:
    """Read from the launcher's environment, before any process group exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    engine = config.engine
    if engine == "auto":
        engine, _ = choose_engine(zero3=by_deepspeed, fsdp=None, world=world, cpu=not torch.cuda.is_available())
    if config.ds_config and engine not in ("zero3", "zero2"):
        raise ValueError(f"ds_config={config.ds_config!r}: engine auto resolved to {engine} here, which does not read "
                         "it; launch with deepspeed or pass --engine zero3/zero2, or drop --ds-config")
    refusal = quantization_refusal(config.quantization, config.quant_storage, engine, config.task, config.model)
    if refusal is not None:  # engine auto resolved to one that shards the base
        raise ValueError(refusal)
    if engine == "local" and world > 1:
        raise ValueError(f"engine=local with WORLD_SIZE={world}: pick ddp, fsdp2, zero3 or zero2 for several processes")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return engine, device


def _start_group(engine: str, config: TrainConfig, device: torch.device) -> None:
    """gloo on the CPU, nccl on GPUs; through DeepSpeed for its engines."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    timeout = timedelta(seconds=config.timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if engine in ("zero3", "zero2"):
        if device.type != "cuda":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed
        except ImportError:
            raise ValueError(f"engine={engine} needs DeepSpeed: pip install deepspeed") from None
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)


def _batch_split(config: TrainConfig, world: int) -> Tuple[int, int]:
    """(micro-batch size, micro-batches per rank per global batch)."""
    micro = config.micro_batch_size or config.global_batch_size // world
    if micro < 1 or config.global_batch_size % (micro * world):
        raise ValueError(f"global_batch_size={config.global_batch_size} is not a multiple of micro_batch_size={micro} "
                         f"x world size {world}")
    return micro, config.global_batch_size // (micro * world)


def deepspeed_config(config: TrainConfig, setup: Setup, stage: int, accumulation: Optional[int] = None) -> dict:
    """The user's DeepSpeed JSON (if any) with our stage, batch sizes and precision; ``accumulation``
    defaults to the run's (GoRA's estimation passes 1: it counts every backward itself)."""
    accumulation = setup.accumulation if accumulation is None else accumulation
    base = read_ds_config(config.ds_config) if config.ds_config else {}
    base["gradient_clipping"] = config.max_grad_norm  # the run's one rule (checked against the file in TrainConfig)
    base.update(train_micro_batch_size_per_gpu=setup.micro, gradient_accumulation_steps=accumulation,
                train_batch_size=setup.micro * accumulation * setup.world, zero_allow_untested_optimizer=True,
                steps_per_print=2**31 - 1)
    base.setdefault("zero_optimization", {})["stage"] = stage
    if config.precision == "bf16":
        base["bf16"] = {"enabled": True}
    return base
