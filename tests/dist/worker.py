"""One rank of the multi-process tests (run by torchrun from tests/test_distributed.py).

    torchrun --nproc_per_node W tests/dist/worker.py ENGINE OUT_DIR [MODE]

Builds the same tiny Llama on every rank (MLP 75 wide, so ZeRO-3's flat partitions cut rows of
gate/up_proj), gives each rank its slice of the same global batches, estimates a GoRA plan under
ENGINE, writes it (rank 0) and per-rank facts as JSON, then trains the adapters a few steps under
the same engine. MODE injects a failure: raise (rank 1's batch has no labels at step 2),
disagree (rank 1 computes a different rank map), short (rank 1 has one batch only), die (rank 1 SIGKILLs itself at step 2, which
torchrun sees), vanish (rank 1 exits quietly with status 0 after its step-2 forward, which torchrun
does not treat as a failure: rank 0 stops because rank 1's sockets closed, which GoRA's wait reports). GORA_TIMEOUT sets the
timeout of GoRA's collectives and of the process group (seconds, default 60); GORA_CONFIG, a JSON
object, overrides fields of CONFIG.
"""

import gc
import json
import os
import signal
import weakref
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import lm_batches, tiny_llama  # noqa: E402

import gora_dist.pipeline.plan  # noqa: E402
from gora_dist import GoRAConfig, gora_modules, save_plan  # noqa: E402
import gora_dist.pipeline.sharded  # noqa: E402
from gora_dist.pipeline.apply import apply_plan  # noqa: E402
from gora_dist.pipeline.sharded import estimate_plan

TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
GLOBAL_BATCH, GRAD_STEPS = 4, 3
CONFIG = GoRAConfig(target_modules=TARGETS, grad_steps=GRAD_STEPS, gamma=0.2, rank_min=2, rank_ref=6, rank_max=16, seed=5,
                    **json.loads(os.environ.get("GORA_CONFIG", "{}")))
DS_CONFIG = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}


def local_slice(batch, rank, world):
    per = GLOBAL_BATCH // world
    return {key: value[rank * per:(rank + 1) * per] for key, value in batch.items()}


def rank_batches(rank, world, mode):
    for step, batch in enumerate(lm_batches(GRAD_STEPS, batch_size=GLOBAL_BATCH), start=1):
        local = local_slice(batch, rank, world)
        if mode == "raise" and rank == 1 and step == 2:
            local = {"input_ids": local["input_ids"]}  # no labels: no loss
        if mode == "die" and rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "short" and rank == 1 and step == 2:
            return  # rank 1's data ends after one batch
        yield local


def main():
    engine, out_dir = sys.argv[1], sys.argv[2]
    mode = sys.argv[3] if len(sys.argv) > 3 else "ok"
    timeout_s = float(os.environ.get("GORA_TIMEOUT", "60"))
    if engine == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=timeout_s))
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1234 + rank)  # the plan must not depend on the global RNG

    if mode == "disagree" and rank == 1:
        original = gora_dist.pipeline.plan.allocate_ranks

        def skewed(*args, **kwargs):
            ranks = original(*args, **kwargs)
            first = next(iter(ranks))
            return {**ranks, first: ranks[first] + 1}

        gora_dist.pipeline.plan.allocate_ranks = skewed

    model = tiny_llama(intermediate_size=75)
    kwargs = {"ds_config": DS_CONFIG} if engine == "zero3" else {}
    steps = {"n": 0}

    def loss_fn(module, batch):
        output = module(**batch)
        steps["n"] += 1
        if mode == "vanish" and rank == 1 and steps["n"] == 2:
            os._exit(0)
        return output.loss

    engines, make_engine = [], gora_dist.pipeline.sharded.make_engine

    def recorded_make_engine(*args, **kwargs):
        made = make_engine(*args, **kwargs)
        engines.append(weakref.ref(made))
        return made

    gora_dist.pipeline.sharded.make_engine = recorded_make_engine
    unsharded = [weakref.ref(model.get_submodule(name).weight) for name, _ in gora_dist.find_target_modules(model, TARGETS).items()]
    plan = estimate_plan(model, rank_batches(rank, world, mode), CONFIG, engine=engine, timeout_s=timeout_s,
                         loss_fn=loss_fn, **kwargs)
    gc.collect()

    facts = {"rank": rank, "world": world, "rank_map": plan.rank_map,
             "flags_restored": all(p.requires_grad for p in model.parameters()), "held_elements": plan.report.accumulator_elements,
             "target_elements": sum(l.shape[0] * l.shape[1] for l in plan.report.layers.values()),
             "bytes": plan.report.timings["bytes_communicated"],
             "engine_freed": len(engines) == 1 and engines[0]() is None,
             "unsharded_weights_freed": all(ref() is None for ref in unsharded)}
    if rank == 0:
        save_plan(plan, os.path.join(out_dir, "plan"), model)

    facts["losses"], facts["base_unchanged"], facts["adapter_checksum"] = train(engine, model, plan, rank, world)
    quantized_folder = os.path.join(out_dir, "quantized_model")
    if os.path.isdir(quantized_folder):  # a 4-bit base: whole on each rank (DDP) or its packed bytes sharded (FSDP2)
        from conftest import load_quantized

        quantized = estimate_plan(load_quantized(quantized_folder, storage=torch.bfloat16), rank_batches(rank, world, mode),
                                  CONFIG, engine=engine, timeout_s=timeout_s)
        facts["quantized_rank_map"] = quantized.rank_map
        facts["quantized_held_elements"] = quantized.report.accumulator_elements
        if rank == 0:
            save_plan(quantized, os.path.join(out_dir, "quantized_plan"))
    if engine == "fsdp2" and mode == "ok":  # the same plan through to_peft on a fresh sharded model
        # (ZeRO-3: tests/test_trainer_integration.py's TRL run, which costs no extra spawn)
        facts["peft_losses"], facts["peft_base_unchanged"], facts["peft_checksum"] = train(
            engine, sharded_model(engine), plan, rank, world, install=gora_dist.to_peft)
    finish(out_dir, rank, facts)


def finish(out_dir, rank, facts):
    """Write this rank's facts, leave the process group together, and exit."""
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(facts, handle)
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter finalisation: a gloo worker thread decref'ing a finished all-gather while
    # Python finalises aborts the process (see launch/train.py for the backtrace).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def base_name(name):
    """The plain model's name of a base parameter under GoRA's layers or PEFT's (and DDP's wrapper)."""
    name = name.removeprefix("module.").removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".").replace(".base.", ".")


def adapter_checksum(model) -> float:
    """The sum of every adapter element (gathered when FSDP2 shards them), to compare replicas."""
    return sum(float((p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double().sum())
               for n, p in model.named_parameters() if ".lora_" in n)


def gora_layers(model, plan):
    apply_plan(model, plan)
    return model


def train(engine, model, plan, rank, world, steps=5, install=gora_layers):
    """A few AdamW steps on the adapters under the same engine, after ``install(model, plan)`` (GoRA's
    layers, or ``to_peft``, which returns the model to run); returns (losses, base weights
    unchanged, adapter checksum)."""
    batch = local_slice(lm_batches(1, batch_size=GLOBAL_BATCH, seed=11)[0], rank, world)
    reference = tiny_llama(intermediate_size=75)
    model = install(model, plan)
    if engine == "zero3":
        import deepspeed

        # the model is still ZeRO-3 partitioned; the adapters get partitioned by initialize
        adapter_params = [p for n, p in model.named_parameters() if ".lora_" in n]
        optimizer = torch.optim.AdamW(adapter_params, lr=1e-2)
        config = {**DS_CONFIG, "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
                  "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        runner, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        losses = []
        for _ in range(steps):
            loss = runner(**batch).loss
            runner.backward(loss)
            runner.step()
            losses.append(float(loss.detach()))
        names = [n for n, p in model.named_parameters()]
        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params):
            unchanged = all(torch.equal(p.detach(), reference.get_parameter(base_name(n)))
                            for n, p in zip(names, params) if ".lora_" not in n)
        runner.destroy()
        return losses, unchanged, None

    runner = model  # fsdp2: the same, still sharded, model; the adapters are replicated on every rank
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = runner(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    state = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in model.named_parameters()}
    unchanged = all(torch.equal(p.detach(), reference.get_parameter(base_name(n)))
                    for n, p in state.items() if ".lora_" not in n)
    return losses, unchanged, adapter_checksum(model)


def sharded_model(engine):
    """A fresh model as the engine holds it before GoRA: ZeRO-3 partitioned, or FSDP2 sharded."""
    model = tiny_llama(intermediate_size=75)
    if engine == "zero3":
        import deepspeed

        deepspeed.zero.Init(module=model, config_dict_or_path={**DS_CONFIG, "train_micro_batch_size_per_gpu": 1})
    else:
        from gora_dist.engines.fsdp2 import fully_shard_model

        fully_shard_model(model)
    return model


if __name__ == "__main__":
    main()
