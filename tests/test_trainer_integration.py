"""GoRA in the training code people run: prepare_gora / prepare_gora_peft before the Trainer, TRL's
SFTTrainer or an accelerate loop wraps the model, GoRAAdapterSaver for PEFT-format adapters in every
checkpoint, and prepare_trainer(trainer) on a TRL run as its sft.py builds it. One process first;
then two spawns at world 2 (tests/dist/trainer_worker.py) run every integration under ZeRO-3, FSDP2
and DDP against one process's plan for the same global batches."""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import lm_batches, tiny_llama
from gora_dist import GoRAConfig, gora_modules
from gora_dist.integrations import GoRAAdapterSaver, prepare_gora
from gora_dist.launcher.processes import free_port

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


class TokenDataset(torch.utils.data.Dataset):
    """64 sequences that repeat a short pattern, so a few steps visibly lower the loss."""

    def __init__(self):
        rows = lm_batches(1, batch_size=8, length=6, seed=3)[0]["input_ids"]
        self.items = [rows[i % 8].repeat(3) for i in range(64)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        ids = self.items[index]
        return {"input_ids": ids, "labels": ids.clone()}


def test_trainer_trains_gora_adapters_and_saves_them_in_peft_format(tmp_path):
    model, dataset = tiny_llama(), TokenDataset()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=12, learning_rate=5e-3,
        save_steps=6, logging_steps=1, report_to=[], use_cpu=True, seed=0, lr_scheduler_type="constant",
    )
    plan = prepare_gora(model, dataset, GoRAConfig(grad_steps=4, target_modules=["q_proj", "v_proj", "o_proj"]), args=args)
    assert plan.report.grad_steps == 4 and len(plan.rank_map) == 6
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[GoRAAdapterSaver(plan)])
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.2, losses
    for name, param in model.named_parameters():  # only adapters moved
        if ".lora_" not in name:
            assert torch.equal(param, before[name.replace(".base.", ".")]), name
    moved = [not torch.equal(m.lora_B.detach(), plan.lora_b[n]) for n, m in gora_modules(model)]
    assert all(moved)

    for folder in (tmp_path / "checkpoint-6" / "gora_adapter", tmp_path / "gora_adapter"):
        assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors", "gora.json"]
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "gora_adapter")
    probe = dataset[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=probe).logits, model(input_ids=probe).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("zero3, fsdp, world, cpu, engine, warns", [
    (True, None, 2, True, "zero3", False),     # a partitioned model / stage-3 config wins
    (True, None, 1, False, "zero3", False),
    (False, 2, 8, False, "fsdp2", False),      # a Trainer's FSDP2 on GPUs: GoRA shards and estimates the same way
    (False, 2, 2, True, "ddp", True),          # accelerate trains with DDP on the CPU: so does the estimate, and says so
    (False, 1, 8, False, "ddp", True),         # FSDP1: no sharded estimate, said
    (False, 2, 1, False, "local", False),      # one process: nothing to shard
    (False, None, 4, False, "ddp", False),
    (False, None, 1, True, "local", False),
])
def test_the_engine_follows_what_the_run_will_do(zero3, fsdp, world, cpu, engine, warns):
    from gora_dist.engines.choice import choose_engine

    chosen, warning = choose_engine(zero3=zero3, fsdp=fsdp, world=world, cpu=cpu)
    assert chosen == engine and (warning is not None) == warns


def test_accelerate_finds_the_blocks_of_a_model_gora_sharded_itself(monkeypatch):
    """fully_shard renames LlamaDecoderLayer to FSDPLlamaDecoderLayer; accelerate looks the wrap classes
    up by name before it sees an FSDPModule (1.15 raised "Could not find the transformer layer class"
    on the GPU suite's H200). The names handed on must resolve in the sharded model."""
    import transformers
    from accelerate.utils.dataclasses import get_module_class_from_name

    from gora_dist.integrations.run_sharding import name_sharded_blocks

    model = tiny_llama()
    for layer in model.model.layers:  # what fully_shard does to each block's class, without a process group
        layer.__class__ = type(f"FSDP{type(layer).__name__}", (type(layer),), {})
    assert get_module_class_from_name(model, "LlamaDecoderLayer") is None
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer")
    args = SimpleNamespace(fsdp_plugin_args={"auto_wrap_policy": "TRANSFORMER_BASED_WRAP"})
    plugin = SimpleNamespace(transformer_cls_names_to_wrap=["LlamaDecoderLayer", "NotInThisModel"])
    name_sharded_blocks(model, args, SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "FSDPLlamaDecoderLayer"  # from _no_split_modules
    assert plugin.transformer_cls_names_to_wrap == ["FSDPLlamaDecoderLayer", "NotInThisModel"]  # the user's, kept
    assert os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "FSDPLlamaDecoderLayer"
    assert get_module_class_from_name(model, "FSDPLlamaDecoderLayer") is type(model.model.layers[0])
    assert isinstance(model.model.layers[0], transformers.models.llama.modeling_llama.LlamaDecoderLayer)


# --- two ranks: the Trainer, TRL and accelerate under ZeRO-3, FSDP2 and DDP (tests/dist/trainer_worker.py) ---

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from trainer_worker import CONFIG as WORKER_CONFIG, PER_DEVICE, PROBE, TRL_PER_DEVICE, sft_arguments, trl_lora  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "dist", "trainer_worker.py")


@pytest.fixture(scope="module")
def one_process_plan():
    """The plan of one process on the same global batches (2 ranks × PER_DEVICE, the same seed)."""
    return prepare_gora(tiny_llama(), TokenDataset(), WORKER_CONFIG, global_batch_size=2 * PER_DEVICE)


@pytest.fixture(scope="module")
def trl_one_process_plan(smol_chat_model, tmp_path_factory):
    """prepare_trainer's plan for TRL's run at world 1 on the same global batches (one process drawing
    2 x TRL_PER_DEVICE examples a micro-batch, the same seed and sampler)."""
    import datasets

    trl = pytest.importorskip("trl")
    from conftest import arithmetic_chats
    from gora_dist.integrations import prepare_trainer

    args = sft_arguments(str(tmp_path_factory.mktemp("trl-one")), per_device=2 * TRL_PER_DEVICE)
    trainer = trl.SFTTrainer(model=smol_chat_model, args=args, peft_config=trl_lora(),
                             train_dataset=datasets.Dataset.from_list(arithmetic_chats()))
    return prepare_trainer(trainer)


def run_worker(launcher, scenario, out, chat_model):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if launcher == "deepspeed":
        command = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
                   WORKER, scenario, str(out), chat_model]
    else:
        command = [shutil.which("torchrun") or "torchrun", "--standalone", "--nproc_per_node", "2", WORKER, scenario, str(out),
                   chat_model]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def facts(out, scenario):
    return [json.loads((out / scenario / f"rank{rank}.json").read_text()) for rank in range(2)]


def check_plan(fact, reference):
    """The rank map of one process, A0 bit-equal, B0 up to float32 summation order; each rank summed half the gradients."""
    assert fact["rank_map"] == reference.rank_map
    for name, lora_a in reference.lora_a.items():
        assert torch.equal(torch.tensor(fact["lora_a"][name]), lora_a), name
        lora_b = reference.lora_b[name]
        assert torch.linalg.norm(torch.tensor(fact["lora_b"][name]) - lora_b) / torch.linalg.norm(lora_b) < 1e-5, name
    assert fact["held_elements"] <= fact["target_elements"] // 2 + 48 * len(reference.rank_map)


def check_training(fact, drop=0.2):
    assert fact["losses"][-1] < fact["losses"][0] - drop, fact["losses"]
    assert fact["base_unchanged"]


def check_trl(facts_of_ranks, reference, chat_model, adapter):
    """TRL + prepare_trainer at two ranks: one process's plan, trained adapters equal on both ranks,
    the base untouched, the PeftModel TRL saved loads with PEFT alone at the plan's ranks."""
    for fact in facts_of_ranks:
        assert fact["is_peft"].endswith("PeftModelForCausalLM")
        check_plan(fact, reference)
        check_training(fact, drop=0.1)  # a random model over SmolLM2's 49,152 tokens: slow to move in 8 steps
    assert facts_of_ranks[0]["checksum"] == pytest.approx(facts_of_ranks[1]["checksum"], rel=1e-7)
    check_loads_in_peft(adapter, reference.rank_map,
                        lambda: transformers.AutoModelForCausalLM.from_pretrained(chat_model))


def check_loads_in_peft(folder, rank_map, base=tiny_llama):
    loaded = peft.PeftModel.from_pretrained(base(), folder)
    for name, rank in rank_map.items():
        assert loaded.base_model.model.get_submodule(name).r["default"] == rank, name


def test_trainer_and_trl_under_zero3_at_two_ranks_and_a_resumed_checkpoint(tmp_path, one_process_plan,
                                                                           trl_one_process_plan, smol_chat_model):
    pytest.importorskip("deepspeed")
    run_worker("deepspeed", "zero3", tmp_path, smol_chat_model)
    for fact in facts(tmp_path, "trainer_zero3"):  # Trainer + ZeRO-3, GoRA's layers, loaded partitioned
        assert fact["partitioned"]
        check_plan(fact, one_process_plan)
        check_training(fact)
    check_loads_in_peft(tmp_path / "trainer" / "gora_adapter", one_process_plan.rank_map)
    assert (tmp_path / "trainer" / "checkpoint-4" / "gora_adapter" / "gora.json").exists()
    uninterrupted = facts(tmp_path, "trainer_zero3")[0]["losses"]
    for fact in facts(tmp_path, "resumed_zero3"):  # resumed at step 4 from the saved plan: the same run
        assert fact["rank_map"] == one_process_plan.rank_map
        assert fact["losses"] == pytest.approx(uninterrupted, rel=1e-6)
    # TRL given the model by name under ZeRO-3, its LoraConfig, then prepare_trainer(trainer)
    assert all(fact["partitioned"] for fact in facts(tmp_path, "trl_zero3"))
    check_trl(facts(tmp_path, "trl_zero3"), trl_one_process_plan, smol_chat_model, tmp_path / "trl_zero3" / "adapter")
    # TRL + prepare_trainer(trainer, initializer="lora_ga", allocator="uniform") under ZeRO-3 (v_proj is 16 x 32:
    # LoRA-GA needs 2r <= 16, so LoRA's r = 4 everywhere): each rank offset its partition of
    # the base; TRL's saved adapter is the rank-2r one that gives the trained model on the original base
    lora_ga = facts(tmp_path, "trl_lora_ga_zero3")
    assert all(fact["partitioned"] and not fact["base_unchanged"] for fact in lora_ga)
    assert lora_ga[0]["losses"][-1] < lora_ga[0]["losses"][0]
    folder = tmp_path / "trl_lora_ga_zero3" / "adapter"
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert {k.replace("\\", ""): v for k, v in saved["rank_pattern"].items()} == {
        name: 2 * rank for name, rank in lora_ga[0]["rank_map"].items()}
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(smol_chat_model), folder)
    with torch.no_grad():
        logits = loaded(input_ids=torch.tensor(PROBE)).logits[0, :, :64]
    for fact in lora_ga:
        torch.testing.assert_close(logits, torch.tensor(fact["probe"]), rtol=0, atol=1e-5)


def test_accelerate_fsdp2_and_the_trainer_under_fsdp2_at_two_ranks(tmp_path, one_process_plan, trl_one_process_plan,
                                                                   smol_chat_model):
    run_worker("torchrun", "torchrun", tmp_path, smol_chat_model)
    for scenario in ("accelerate_ddp", "peft_fsdp2"):
        for fact in facts(tmp_path, scenario):
            check_plan(fact, one_process_plan)
            assert fact["losses"][-1] < fact["losses"][0] - 0.2, (scenario, fact["losses"])
    for scenario in ("accelerate_ddp", "peft_fsdp2"):  # replicated adapters stay equal on both ranks
        both = facts(tmp_path, scenario)
        assert all(fact["base_unchanged"] for fact in both)
        assert both[0]["checksum"] == both[1]["checksum"], scenario
    assert all(fact["sharded_weights"] for fact in facts(tmp_path, "peft_fsdp2"))
    check_loads_in_peft(tmp_path / "accelerate" / "peft_adapter", one_process_plan.rank_map)
    # TRL asked for FSDP2 on the CPU: accelerate trains with DDP there, GoRA estimates with DDP and says so
    on_cpu = facts(tmp_path, "trl_fsdp_on_cpu")
    check_trl(on_cpu, trl_one_process_plan, smol_chat_model, tmp_path / "trl_fsdp_on_cpu" / "adapter")
    assert all(any("FSDP was asked for on the CPU" in message for message in fact["warnings"]) for fact in on_cpu)
    # the Trainer under FSDP2 proper (accelerate's device gate lifted on the CPU: tests/dist/fsdp_on_cpu.py)
    trainer_fsdp2 = facts(tmp_path, "trainer_fsdp2")
    for fact in trainer_fsdp2:
        assert fact["fsdp2"] and fact["wrapped_as_is"] and fact["sharded_weights"]  # accelerate took GoRA's FSDPModule
        check_plan(fact, one_process_plan)
        check_training(fact)
    assert trainer_fsdp2[0]["checksum"] == trainer_fsdp2[1]["checksum"]  # replicated adapters stayed equal
    for folder in (tmp_path / "trainer_fsdp2" / "checkpoint-4" / "gora_adapter", tmp_path / "trainer_fsdp2" / "gora_adapter"):
        check_loads_in_peft(folder, one_process_plan.rank_map)
    assert (tmp_path / "trainer_fsdp2" / "checkpoint-4" / "model.safetensors").exists()  # the full-state checkpoint
    for fact in facts(tmp_path, "resumed_fsdp2"):  # resumed at step 4 from its checkpoint and saved plan: the same run
        assert fact["rank_map"] == one_process_plan.rank_map
        assert fact["losses"] == pytest.approx(trainer_fsdp2[0]["losses"], rel=1e-6)
    # TRL + PEFT under the Trainer's FSDP2: the base sharded, the PeftModel the root accelerate took as it is
    trl_fsdp2 = facts(tmp_path, "trl_fsdp2")
    assert all(fact["fsdp2"] and fact["sharded_weights"] and not fact["warnings"] for fact in trl_fsdp2)
    check_trl(trl_fsdp2, trl_one_process_plan, smol_chat_model, tmp_path / "trl_fsdp2" / "adapter")
    assert trl_fsdp2[0]["losses"] == pytest.approx(on_cpu[0]["losses"], rel=1e-5)  # the same run as with DDP
