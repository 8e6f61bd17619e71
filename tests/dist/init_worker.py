"""One rank of tests/test_initializers.py's world-2 test: LoRA-GA, LoRA-One and PiSSA under FSDP2,
ZeRO-3 and DDP, and LoRA-GA at GoRA's ranks under ZeRO-3, in one process group (one spawn for all ten).

    torchrun --nproc_per_node 2 tests/dist/init_worker.py OUT_DIR

For each engine and initializer: a fresh tiny Llama (MLP 191 wide: ZeRO-3's partitions cut a row),
the plan estimated under the engine on this rank's slice of the global batches, applied to the model
as the engine holds it (the base offset on each rank's own part), then every target's base weight
and effective weight (base + s·B0·A0) gathered and written by rank 0, with per-layer facts: the
elements of Ḡ or W this rank passed into the SVD, and the largest tensor any operation created during
that layer's SVD (a TorchDispatchMode sees every op).
"""

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import lm_batches, tiny_llama  # noqa: E402
from worker import finish  # noqa: E402

import gora_dist.pipeline.svd_init as svd_init  # noqa: E402
from gora_dist import GoRAConfig, gora_modules  # noqa: E402
from gora_dist.pipeline.apply import apply_plan  # noqa: E402
from gora_dist.pipeline.sharded import estimate_plan  # noqa: E402

TARGETS = ["v_proj", "gate_proj", "down_proj"]
GLOBAL_BATCH, GRAD_STEPS, WIDTH = 4, 2, 191
INITIALIZERS = ("lora_ga", "lora_one", "pissa")
ENGINES = ("fsdp2", "zero3", "ddp")
CASES = [(engine, initializer, "uniform") for engine in ENGINES for initializer in INITIALIZERS] + [
    ("zero3", "lora_ga", "gora")]  # heterogeneous ranks through the sharded SVD and the partitioned offset
DS_CONFIG = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": False}, "train_micro_batch_size_per_gpu": 1}


def config_for(initializer: str, allocator: str = "uniform") -> GoRAConfig:
    return GoRAConfig(target_modules=TARGETS, allocator=allocator, rank_ref=4, rank_min=1, rank_max=6,
                      grad_steps=GRAD_STEPS, initializer=initializer, seed=3)


def case_key(engine: str, initializer: str, allocator: str) -> str:
    return f"{engine}-{initializer}" + ("" if allocator == "uniform" else f"-{allocator}")


def rank_batches(rank, world):
    per = GLOBAL_BATCH // world
    for batch in lm_batches(GRAD_STEPS, batch_size=GLOBAL_BATCH):
        yield {key: value[rank * per:(rank + 1) * per] for key, value in batch.items()}


class LargestCreated(TorchDispatchMode):
    """The most elements any operation's output had while active."""

    def __init__(self):
        super().__init__()
        self.largest, self.largest_op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and value.numel() > self.largest:
                self.largest, self.largest_op = value.numel(), f"{func} {tuple(value.shape)}"
        return out


ORIGINAL_SVD = svd_init.sharded_svd


def watched_svd(facts):
    """The sharded SVD, recording into this case's ``facts`` (wrapping the original, not the previous case's wrapper)."""
    original = ORIGINAL_SVD

    def svd(pieces, rank, reduce, **kwargs):
        with LargestCreated() as mode:
            found = original(pieces, rank, reduce, **kwargs)
        shard = pieces[0][1]
        facts[kwargs["name"]] = {"input_elements": sum(flat.numel() for flat, _ in pieces),
                                 "largest_created": mode.largest, "largest_op": mode.largest_op, "full_elements": shard.rows * shard.cols}
        return found

    return svd


def full_weight(weight, engine):
    if engine == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            return weight.detach().clone()
    if engine == "ddp":  # every rank holds the whole weight (and offset all of it)
        return weight.detach().clone()
    return weight.full_tensor().detach().clone()


def main():
    import deepspeed

    out_dir = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    facts = {}
    for engine, initializer, allocator in CASES:
        key = case_key(engine, initializer, allocator)
        facts[key] = {"svd": {}}
        svd_init.sharded_svd = watched_svd(facts[key]["svd"])
        model = tiny_llama(intermediate_size=WIDTH)
        kwargs = {"ds_config": DS_CONFIG} if engine == "zero3" else {}
        plan = estimate_plan(model, rank_batches(rank, world), config_for(initializer, allocator), engine=engine,
                             **kwargs)
        apply_plan(model, plan)
        facts[key]["rank_map"] = plan.rank_map
        tensors = {}
        for name, adapter in gora_modules(model):
            base = full_weight(adapter.base.weight, engine)
            update = adapter.scaling * plan.lora_b[name] @ plan.lora_a[name]
            tensors[f"{name}.base"], tensors[f"{name}.effective"] = base, base + update
        if rank == 0:
            save_file(tensors, os.path.join(out_dir, f"{key}.safetensors"))
    finish(out_dir, rank, facts)


if __name__ == "__main__":
    main()
