"""One rank of the training-code integration tests (tests/test_trainer_integration.py), at world 2.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/dist/trainer_worker.py zero3 OUT CHAT_MODEL
    torchrun --nproc_per_node 2 tests/dist/trainer_worker.py torchrun OUT CHAT_MODEL

zero3: the Trainer under DeepSpeed ZeRO-3 with GoRA's layers (a checkpoint at step 4), the same run
resumed from that checkpoint with its saved plan, then TRL's SFTTrainer as its sft.py builds it (the
model folder CHAT_MODEL by name, so loaded partitioned; chat records; a LoraConfig) with
``prepare_trainer``. torchrun: an accelerate loop (DDP on the CPU) with a PEFT model, TRL asked for
FSDP2 on the CPU (accelerate runs DDP there: GoRA estimates with DDP and says so), FSDP2 with the
PEFT model in a plain loop, then the Trainer under FSDP2 proper (accelerate's device gate lifted,
tests/dist/fsdp_on_cpu.py) with checkpoints, the same run resumed from its step-4 checkpoint, and TRL
+ PEFT under that FSDP2 (GoRA shards the base and makes the PeftModel the root).
device (one rank, for benchmarks/gpu_suite.py): the Trainer with FSDP2 on the GPU, the model sharded
by GoRA. Each scenario writes OUT/<scenario>/rank<R>.json.
"""

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny_llama  # noqa: E402

from worker import adapter_checksum, base_name  # noqa: E402  (beside this file)

from gora_dist import GoRAConfig  # noqa: E402
from gora_dist.integrations import GoRAAdapterSaver, prepare_gora, prepare_gora_peft  # noqa: E402

CONFIG = GoRAConfig(grad_steps=4, target_modules=["q_proj", "v_proj", "o_proj"], seed=0)  # seed: batches and A0 alike
PER_DEVICE, STEPS = 4, 8
TRL_PER_DEVICE, TRL_TARGETS = 2, ["q_proj", "v_proj", "down_proj"]
DS_CONFIG = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
             "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}


def token_dataset():
    """64 sequences that repeat a short pattern (tests/test_trainer_integration.py's data)."""
    from test_trainer_integration import TokenDataset

    return TokenDataset()


def training_args(out, use_cpu=True, **extra):
    import transformers

    return transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=PER_DEVICE, max_steps=STEPS, learning_rate=5e-3, save_steps=4,
        logging_steps=1, report_to=[], use_cpu=use_cpu, seed=0, lr_scheduler_type="constant", **extra)


def base_unchanged(model, reference=None) -> bool:
    """Every non-adapter weight equals ``reference`` ({name: tensor}; the freshly built tiny Llama's by
    default), gathered when partitioned or sharded."""
    reference = dict(tiny_llama().named_parameters()) if reference is None else reference
    named = [(n, p) for n, p in model.named_parameters() if ".lora_" not in n]
    partitioned = [p for _, p in named if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned):
            return all(torch.equal(p.detach(), reference[base_name(n)]) for n, p in named)
    return all(torch.equal((p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu(), reference[base_name(n)])
               for n, p in named)


def write(out, scenario, **facts):
    folder = os.path.join(out, scenario)
    os.makedirs(folder, exist_ok=True)
    facts.update(rank=dist.get_rank())
    with open(os.path.join(folder, f"rank{dist.get_rank()}.json"), "w") as handle:
        json.dump(facts, handle)


def plan_facts(plan):
    return {"rank_map": plan.rank_map, "held_elements": plan.report.accumulator_elements,
            "target_elements": sum(layer.shape[0] * layer.shape[1] for layer in plan.report.layers.values()),
            "lora_a": {n: a.tolist() for n, a in plan.lora_a.items()}, "lora_b": {n: b.tolist() for n, b in plan.lora_b.items()}}


def next_run(trainer):
    """Let a second DeepSpeed Trainer start in this process (accelerate allows one DeepSpeed
    Accelerator per process; resetting its shared state is how accelerate's own tests do it)."""
    from accelerate.state import AcceleratorState

    trainer.accelerator.free_memory()
    AcceleratorState._reset_state()


def sharded_weights(model) -> bool:
    """Every non-adapter weight is an FSDP2 shard (a DTensor)."""
    return all(hasattr(p, "device_mesh") for n, p in model.named_parameters() if ".lora_" not in n)


def resume_at_step_4(out, scenario, model, dataset, args, **prepare_options):
    """The run in ``args.output_dir`` resumed from its step-4 checkpoint with the plan saved there (no
    second estimation); writes the rank map and the losses as ``scenario`` and returns the trainer."""
    import transformers

    checkpoint = os.path.join(args.output_dir, "checkpoint-4")
    plan = prepare_gora(model, dataset, CONFIG, args=args, plan_from=os.path.join(checkpoint, "gora_adapter"),
                        **prepare_options)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[GoRAAdapterSaver(plan)])
    trainer.train(resume_from_checkpoint=checkpoint)
    write(out, scenario, rank_map=plan.rank_map, losses=losses_of(trainer))
    return trainer


def losses_of(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def zero3_scenarios(out, model_folder):
    import transformers

    folder = os.path.join(out, "model")
    if dist.get_rank() == 0:
        tiny_llama().save_pretrained(folder)
    dist.barrier()

    # Trainer + ZeRO-3, GoRA's layers; the arguments come first so from_pretrained loads partitioned
    args = training_args(os.path.join(out, "trainer"), deepspeed=DS_CONFIG)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
    dataset = token_dataset()
    plan = prepare_gora(model, dataset, CONFIG, args=args)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[GoRAAdapterSaver(plan)])
    trainer.train()
    write(out, "trainer_zero3", partitioned=partitioned, losses=losses_of(trainer), base_unchanged=base_unchanged(model),
          **plan_facts(plan))
    next_run(trainer)
    del trainer, model

    # the same run resumed from its step-4 checkpoint: the saved plan, not a second estimation
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    trainer = resume_at_step_4(out, "resumed_zero3", model, dataset, args)
    next_run(trainer)
    del trainer, model

    # TRL's SFTTrainer given the model by name under ZeRO-3 (so it loads partitioned), with its PEFT config
    trl_run(out, "trl_zero3", model_folder, deepspeed=DS_CONFIG)
    # LoRA-GA through the same call: each rank offsets its partition, the saved adapter is for the original base
    trl_run(out, "trl_lora_ga_zero3", model_folder, deepspeed=DS_CONFIG, gora_options={"initializer": "lora_ga", "allocator": "uniform"})


def sft_arguments(out, per_device=TRL_PER_DEVICE, **extra):
    """TRL's SFTConfig for the world-2 runs: 2 examples a micro-batch, 2 micro-batches an optimizer step
    (8 examples a step, as the one-process reference's 4 x 2 in tests/test_trainer_integration.py)."""
    from trl import SFTConfig

    return SFTConfig(output_dir=out, per_device_train_batch_size=per_device, gradient_accumulation_steps=2,
                     max_steps=STEPS, learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                     save_strategy="no", lr_scheduler_type="constant", max_length=64, bf16=False, **extra)


def trl_lora():
    """The LoraConfig TRL's sft.py builds from --use_peft --lora_r 4 --lora_alpha 8 --lora_target_modules ...:
    GoRA's budget and options (ranks in [2, 16])."""
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=TRL_TARGETS, task_type="CAUSAL_LM")


PROBE = [[1, 5, 9, 42, 7, 3]]


def trl_run(out, scenario, model_folder, engine="auto", gora_options=None, **extra):
    """TRL's own setup, as its sft.py builds it (model by name, raw chat records, a LoraConfig), then
    GoRA's one call (with ``gora_options``); trains, saves the PEFT adapter and writes the facts, with
    the trained model's logits on PROBE (every rank runs the forward: a collective when sharded)."""
    import datasets
    from safetensors.torch import load_file
    from trl import SFTTrainer

    from conftest import arithmetic_chats
    from gora_dist.integrations import prepare_trainer

    trainer = SFTTrainer(model=model_folder, args=sft_arguments(os.path.join(out, scenario), **extra),
                         peft_config=trl_lora(), train_dataset=datasets.Dataset.from_list(arithmetic_chats()))
    partitioned = all(hasattr(p, "ds_id") for n, p in trainer.model.named_parameters() if ".lora_" not in n)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = prepare_trainer(trainer, engine=engine, **(gora_options or {}))
    trainer.train()
    trainer.save_model(os.path.join(out, scenario, "adapter"))
    with torch.no_grad():  # the model with its LoRA layers, outside accelerate's wrapped forward
        probe = trainer.model.get_base_model()(input_ids=torch.tensor(PROBE)).logits[0, :, :64]
    write(out, scenario, losses=losses_of(trainer), is_peft=type(trainer.model).__name__, partitioned=partitioned,
          base_unchanged=base_unchanged(trainer.model, load_file(os.path.join(model_folder, "model.safetensors"))),
          sharded_weights=sharded_weights(trainer.model), fsdp2=trainer.accelerator.is_fsdp2,
          warnings=[str(w.message) for w in caught if "GoRA" in str(w.message)], checksum=adapter_checksum(trainer.model),
          probe=probe.tolist(), **plan_facts(plan))
    next_run(trainer)


def torchrun_scenarios(out, model_folder):
    import transformers
    from accelerate import Accelerator

    dataset = token_dataset()

    # an accelerate loop (DDP on the CPU) with the plan as a PEFT model
    accelerator = Accelerator(cpu=True)
    model, plan = prepare_gora_peft(tiny_llama(), dataset, CONFIG, accelerator=accelerator,
                                    global_batch_size=PER_DEVICE * dist.get_world_size())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=PER_DEVICE, shuffle=False)
    runner, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    runner.train()
    for _, batch in zip(range(STEPS), loader):
        loss = runner(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    if accelerator.is_main_process:
        accelerator.unwrap_model(runner).save_pretrained(os.path.join(out, "accelerate", "peft_adapter"))
    write(out, "accelerate_ddp", losses=losses, base_unchanged=base_unchanged(runner),
          checksum=adapter_checksum(runner), **plan_facts(plan))

    # TRL asked for FSDP2 on the CPU: accelerate runs DDP there, so GoRA estimates with DDP and says so
    trl_run(out, "trl_fsdp_on_cpu", model_folder, fsdp=True, fsdp_config={"version": 2})

    # FSDP2 in a plain loop with the PEFT model: adapters replicated beside the weight shards
    model, plan = prepare_gora_peft(tiny_llama(), dataset, CONFIG, engine="fsdp2",
                                    global_batch_size=PER_DEVICE * dist.get_world_size())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    model.train()
    for step in range(STEPS):
        index = (step * dist.get_world_size() + dist.get_rank()) * PER_DEVICE % len(dataset)
        batch = torch.utils.data.default_collate([dataset[i] for i in range(index, index + PER_DEVICE)])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    write(out, "peft_fsdp2", losses=losses, base_unchanged=base_unchanged(model), sharded_weights=sharded_weights(model),
          checksum=adapter_checksum(model), **plan_facts(plan))

    # the Trainer with FSDP2 (accelerate's device gate lifted: tests/dist/fsdp_on_cpu.py), GoRA's layers
    # on the model GoRA sharded; full-state checkpoints at step 4 and 8, then the run resumed at step 4
    from fsdp_on_cpu import lift_accelerate_fsdp_device_gate

    lift_accelerate_fsdp_device_gate()
    args = training_args(os.path.join(out, "trainer_fsdp2"), fsdp=True, fsdp_config={"version": 2})
    model = tiny_llama()
    plan = prepare_gora(model, dataset, CONFIG, args=args, engine="fsdp2")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[GoRAAdapterSaver(plan)])
    trainer.train()
    trained = trainer.model
    write(out, "trainer_fsdp2", losses=losses_of(trainer), base_unchanged=base_unchanged(trained),
          sharded_weights=sharded_weights(trained),
          fsdp2=trainer.accelerator.is_fsdp2, wrapped_as_is=trained is model, checksum=adapter_checksum(trained),
          **plan_facts(plan))
    next_run(trainer)
    del trainer, model, trained

    trainer = resume_at_step_4(out, "resumed_fsdp2", tiny_llama(), dataset, args, engine="fsdp2")
    next_run(trainer)

    # TRL + PEFT under the Trainer's FSDP2: GoRA shards the base and makes the PeftModel the FSDP2 root
    # (on GPUs engine="auto" finds FSDP2; on CPU ranks accelerate would train with DDP but for the lifted gate)
    trl_run(out, "trl_fsdp2", model_folder, engine="fsdp2", fsdp=True, fsdp_config={"version": 2})


def device_scenarios(out):
    """One rank on the machine's GPU (benchmarks/gpu_suite.py): a Trainer asked for FSDP2 with the model
    GoRA sharded itself (engine="fsdp2": estimation under FSDP2, then accelerate takes the FSDPModule as
    it is), beside the plan one process computes with no engine on the same batches. Without a GPU
    (the suite's dry run) accelerate's device gate is lifted, as in the world-2 test."""
    import transformers

    from gora_dist import save_adapter

    dataset = token_dataset()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    reference = prepare_gora(tiny_llama().to(device), dataset, CONFIG, global_batch_size=PER_DEVICE, engine="local")
    args = training_args(os.path.join(out, "trainer_device"), use_cpu=not on_gpu, fsdp=True,
                         fsdp_config={"version": 2}, save_strategy="no")
    model = tiny_llama().to(device)
    if not on_gpu:
        from fsdp_on_cpu import lift_accelerate_fsdp_device_gate

        lift_accelerate_fsdp_device_gate()
    engine = "fsdp2"
    plan = prepare_gora(model, dataset, CONFIG, args=args, engine=engine)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    trained = trainer.model
    adapters_on = sorted({str(p.device.type) for n, p in trained.named_parameters() if ".lora_" in n})
    folder = os.path.join(out, "trainer_fsdp2_device", "adapter")
    save_adapter(trained, folder, plan.report)
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(tiny_llama(), folder)
    write(out, "trainer_fsdp2_device", device=str(device), engine=engine, losses=losses_of(trainer),
          sharded_weights=sharded_weights(trained), adapter_devices=adapters_on, base_unchanged=base_unchanged(trained),
          peft_loaded=sum(1 for n, _ in loaded.named_parameters() if ".lora_A" in n),
          fsdp_plugin=getattr(trainer.accelerator.state, "fsdp_plugin", None) is not None,
          reference=plan_facts(reference), **plan_facts(plan))


def main():
    scenario, out, *model_folder = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]  # deepspeed adds it
    if scenario == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        zero3_scenarios(out, *model_folder)
    elif scenario == "device":
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        device_scenarios(out)
    else:
        dist.init_process_group("gloo")
        torchrun_scenarios(out, *model_folder)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/dist/worker.py: no gloo teardown race at interpreter exit


if __name__ == "__main__":
    main()
