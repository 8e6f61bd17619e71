"""Training the adapters under each engine: :func:`trainer_for` puts the plan into the model and wraps
it for the run's engine, behind one small interface the training loop uses:
``micro_step(batch, accumulation)``, ``gradient_norm()`` (the run's, before clipping; a collective),
``optimizer_step(norm, skip)`` (clipped by the one rule of gradients.py), ``logits(inputs)``, ``generate(inputs)``,
``full_trainable()``, ``full_optimizer_state()``, ``load_optimizer_state(tensors, step)``, ``close()``.
The "full_*" methods are collectives: every rank calls them, and only rank 0 (which writes the files)
gets the full tensors; the others get {} and hold no copy.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Tuple, Union

import torch
import torch.nn as nn

from gora_dist.comm.gather import full_copy, gather_partitions
from gora_dist.launcher.config import TrainConfig
from gora_dist.launcher.gradients import clip_coefficient, scale_gradients, torch_grad_norm
from gora_dist.launcher.optimization import make_optimizer, set_schedule_step
from gora_dist.launcher.planning import Start
from gora_dist.launcher.processes import Setup, deepspeed_config
from gora_dist.memory_trace import phase
from gora_dist.pipeline.apply import apply_plan

MOMENTS = ("exp_avg", "exp_avg_sq")


@torch.no_grad()
def greedy_generate(model: nn.Module, inputs: dict, synced: bool, **options) -> torch.Tensor:
    """Greedy decoding with the KV cache: (batch, prompt + new tokens). synced: the parameters are
    sharded (FSDP2, ZeRO-3), so every rank keeps running forwards until the last rank is done."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, num_beams=1, use_cache=True, max_new_tokens=options.pop("max_new_tokens"),
                              eos_token_id=options.pop("eos_token_id"), pad_token_id=options.pop("pad_token_id"))
    return model.generate(**inputs, generation_config=config, synced_gpus=synced, **options)


def trainable_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """The adapters' A and B, and any module trained in full (a classification head)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def optimizer_for(named: List[Tuple[str, nn.Parameter]], config: TrainConfig):
    """The run's AdamW (LoRA+ groups) and schedule, from its config."""
    return make_optimizer(named, lr=config.lr, steps=config.steps, loraplus_lr_ratio=config.loraplus_lr_ratio,
                          weight_decay=config.weight_decay, warmup_ratio=config.warmup_ratio,
                          schedule=config.lr_schedule, min_lr_ratio=config.min_lr_ratio)


class TorchTraining:
    """One process, DDP or FSDP2: a torch optimizer over the (possibly DTensor) adapter parameters."""

    def __init__(self, model: nn.Module, runner: nn.Module, config: TrainConfig, device: torch.device,
                 synced_generation: bool = False, main: bool = True) -> None:
        self.model, self.runner, self.device, self.main = model, runner, device, main
        self.synced_generation = synced_generation
        self.named = trainable_parameters(model)
        self.optimizer, self.scheduler = optimizer_for(self.named, config)
        self.max_grad_norm = config.max_grad_norm

    def train_mode(self, training: bool) -> None:
        self.runner.train(training)

    loss_fn = None
    """``loss_fn(runner, batch)`` (the task's, e.g. SFT's logits at target positions only), or the
    model's own ``.loss``."""

    def micro_step(self, batch: dict, accumulation: int) -> float:
        loss = self.loss_fn(self.runner, batch) if self.loss_fn else self.runner(**batch).loss
        (loss / accumulation).backward()
        return float(loss.detach())

    def gradient_norm(self) -> float:
        return torch_grad_norm([param for _, param in self.named])

    def learning_rate(self) -> float:
        """The learning rate of this step's update (the first group's: A's under LoRA+)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def optimizer_step(self, norm: float, skip: bool = False) -> None:
        """Clip by the run's rule and update; ``skip``: no update (the schedule still counts the step)."""
        if not skip:
            scale_gradients([param for _, param in self.named], clip_coefficient(norm, self.max_grad_norm))
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def logits(self, inputs: dict, **kwargs) -> torch.Tensor:
        return self.runner(**inputs, **kwargs).logits.float()

    def generate(self, inputs: dict, **options) -> torch.Tensor:
        return greedy_generate(self.model, inputs, self.synced_generation, **options)  # DDP: its module alone

    def _to_main(self, tensors) -> Dict[str, torch.Tensor]:
        """Full copies on rank 0: FSDP2-sharded tensors (DTensors) by a collective every rank joins,
        replicated ones (the adapters) copied by rank 0 alone."""
        full = {}
        for name, tensor in tensors:
            if hasattr(tensor, "full_tensor") or self.main:
                copy = full_copy(tensor)
                if self.main:
                    full[name] = copy
        return full

    def full_trainable(self) -> Dict[str, torch.Tensor]:
        return self._to_main(self.named)

    def full_optimizer_state(self) -> Dict[str, torch.Tensor]:
        moments = []
        for name, param in self.named:
            entry = self.optimizer.state.get(param, {})
            moments += [(f"{name}/{key}", entry[key]) for key in MOMENTS if key in entry]
        return self._to_main(moments)

    def load_optimizer_state(self, tensors: Dict[str, torch.Tensor], step: int) -> None:
        for name, param in self.named:
            entry = {"step": torch.tensor(float(step))}
            for key in MOMENTS:
                full = tensors[f"{name}/{key}"]
                if hasattr(param, "device_mesh"):
                    from torch.distributed.tensor import distribute_tensor

                    entry[key] = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh,
                                                   param.placements, src_data_rank=None)
                else:
                    entry[key] = full.to(param.device, param.dtype).clone()
            self.optimizer.state[param] = entry
        set_schedule_step(self.optimizer, self.scheduler, step)

    def close(self) -> None:
        pass


class DeepSpeedTraining:
    """ZeRO-2/3: deepspeed.initialize over the adapters; full tensors on rank 0 from the ZeRO-3
    partitions gathered to rank 0 in one collective (``safe_get_local_*``), DeepSpeed's
    ``safe_get_full_*`` under ZeRO-2, and ``safe_set_full_optimizer_state`` to resume."""

    def __init__(self, model: nn.Module, config: TrainConfig, ds_config: dict, synced_generation: bool = False) -> None:
        import deepspeed

        self.model, self.synced_generation = model, synced_generation
        self.named = trainable_parameters(model)
        optimizer, scheduler = optimizer_for(self.named, config)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.device = self.engine.device

    def train_mode(self, training: bool) -> None:
        self.engine.train(training)

    loss_fn = None

    def micro_step(self, batch: dict, accumulation: int) -> float:
        loss = self.loss_fn(self.engine, batch) if self.loss_fn else self.engine(**batch).loss
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only counts the micro-step; the update is optimizer_step's
        return float(loss.detach())

    def gradient_norm(self) -> float:
        """Before DeepSpeed's step: ZeRO-3's fp32 gradient partitions (disjoint) summed over the ranks;
        under ZeRO-2 the full gradients (a collective per parameter)."""
        import torch.distributed as dist
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        if self._partitioned:
            local = [safe_get_local_grad(p) for _, p in self.named]
            total = torch.stack([g.float().pow(2).sum() for g in local if g is not None]).sum().reshape(1)
            dist.all_reduce(total)
            return float(total.sqrt())
        grads = [safe_get_full_grad(p) for _, p in self.named]
        return float(torch.stack([g.float().pow(2).sum() for g in grads if g is not None]).sum().sqrt())

    def learning_rate(self) -> float:
        return float(self.engine.get_lr()[0])

    def optimizer_step(self, norm: float, skip: bool = False) -> None:
        """DeepSpeed's step clips by ``gradient_clipping`` (set from max_grad_norm, the same rule) and
        skips an update whose gradient norm is not finite; ``skip`` with a finite norm (a non-finite
        loss) makes one gradient element NaN so that DeepSpeed's own skip runs."""
        if skip:
            import math

            if math.isfinite(norm):
                self._poison_gradient()
        self.engine.step()
        if not self.engine.was_step_applied():
            self.scheduler.step()  # DeepSpeed leaves the schedule behind on a skipped step; torch's counts it

    def _poison_gradient(self) -> None:
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad, safe_set_full_grad, safe_set_local_grad

        _, param = self.named[0]
        if self._partitioned:
            grad = safe_get_local_grad(param).clone()
            grad.view(-1)[0] = float("nan")
            safe_set_local_grad(param, grad)
        else:
            grad = safe_get_full_grad(param).clone()
            grad.view(-1)[0] = float("nan")
            safe_set_full_grad(param, grad)

    @torch.no_grad()
    def logits(self, inputs: dict, **kwargs) -> torch.Tensor:
        return self.engine(**inputs, **kwargs).logits.float()

    def generate(self, inputs: dict, **options) -> torch.Tensor:
        return greedy_generate(self.engine.module, inputs, self.synced_generation, **options)

    @property
    def _partitioned(self) -> bool:
        return any(hasattr(p, "ds_id") for _, p in self.named)

    def full_trainable(self) -> Dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

        if self._partitioned:  # ZeRO-3: every rank's fp32 partitions, gathered to rank 0 in one collective
            parts = [(name, safe_get_local_fp32_param(p), tuple(p.ds_shape)) for name, p in self.named]
            return gather_partitions(parts, self.engine.global_rank, self.engine.world_size)
        full = {name: safe_get_full_fp32_param(p).detach().to("cpu", torch.float32) for name, p in self.named}
        return full if self.engine.global_rank == 0 else {}

    def full_optimizer_state(self) -> Dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_optimizer_state, safe_get_local_optimizer_state

        if self._partitioned:
            parts = [(f"{name}/{key}", safe_get_local_optimizer_state(p, key), tuple(p.ds_shape))
                     for name, p in self.named for key in MOMENTS]
            return gather_partitions(parts, self.engine.global_rank, self.engine.world_size)
        state = {}
        for name, param in self.named:
            for key in MOMENTS:
                value = safe_get_full_optimizer_state(param, key)
                if value is not None:
                    state[f"{name}/{key}"] = value.detach().to("cpu", torch.float32)
        return state if self.engine.global_rank == 0 else {}

    def load_optimizer_state(self, tensors: Dict[str, torch.Tensor], step: int) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        inner = self.optimizer.optimizer  # the torch AdamW over ZeRO-3's flat fp32 partitions
        for flat in getattr(self.optimizer, "fp32_partitioned_groups_flat", []):
            if not inner.state[flat]:  # AdamW makes its state at the first step: make it now
                inner.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                     "exp_avg_sq": torch.zeros_like(flat)}
        for name, param in self.named:
            for key in MOMENTS:
                safe_set_full_optimizer_state(param, tensors[f"{name}/{key}"].to(self.device), key)
        for entry in self.optimizer.optimizer.state.values():  # every parameter has taken ``step`` steps
            if "step" in entry:
                entry["step"] = torch.tensor(float(step)) if torch.is_tensor(entry["step"]) else step
        set_schedule_step(self.optimizer, self.scheduler, step)

    def close(self) -> None:
        self.engine.destroy()  # without it DeepSpeed sometimes aborts at interpreter shutdown


@contextlib.contextmanager
def trainer_for(model: nn.Module, start: Start, config: TrainConfig, setup: Setup,
                loss_fn=None) -> Iterator[Union[TorchTraining, DeepSpeedTraining]]:
    """The plan's adapters put into the model as loaded (still sharded by FSDP2 or partitioned by
    ZeRO-3 after estimation), wrapped for training by the engine, at ``start``'s step; closed at the end."""
    phase("training setup")
    apply_plan(model, start.plan)
    trainer = _wrap(model, config, setup)
    trainer.loss_fn = loss_fn
    try:
        if start.optimizer_state is not None:
            trainer.load_optimizer_state(start.optimizer_state, start.step)
        yield trainer
    finally:
        trainer.close()


def _wrap(model: nn.Module, config: TrainConfig, setup: Setup) -> Union[TorchTraining, DeepSpeedTraining]:
    if setup.engine == "fsdp2":  # already sharded; the adapters are replicated (see gora_dist.comm.replicated)
        return TorchTraining(model, model, config, setup.device, synced_generation=setup.world > 1, main=setup.main)
    if setup.engine in ("zero3", "zero2"):
        stage = 3 if setup.engine == "zero3" else 2
        ds_config = deepspeed_config(config, setup, stage)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # DeepSpeed allocates its gradient bucket at reduce_bucket_size (default 5e8 elements, 2 GB in
        # float32) however few parameters train; the adapters need at most their own size
        ds_config["zero_optimization"].setdefault("reduce_bucket_size", max(1, min(int(5e8), trainable)))
        return DeepSpeedTraining(model, config, ds_config, synced_generation=stage == 3 and setup.world > 1)
    if setup.engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model, device_ids=[setup.device] if setup.device.type == "cuda" else None)
        return TorchTraining(model, runner, config, setup.device, main=setup.main)
    return TorchTraining(model, model, config, setup.device)
