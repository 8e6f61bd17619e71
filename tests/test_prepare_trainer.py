"""prepare_trainer(trainer) on one process: TRL's SFTTrainer given a model folder by name, chat data
rendered with SmolLM2's template and its prompt masked, a PEFT LoraConfig as GoRA's budget, two
micro-batches per optimizer step; a plain Trainer with its own collator and compute_loss. The
estimated Ḡ is the gradient the trainer's own training_step produces; the trainer keeps its
PeftModel with the plan in it; checkpoints carry the plan and a resumed run reuses it; each bad input
is refused before anything is estimated. The same at two ranks: tests/test_trainer_integration.py."""

import json
import os

import pytest
import torch

from conftest import arithmetic_chats, tiny_llama
from gora_dist import GoRAConfig
from gora_dist.method.initialization import gora_init_b, rslora_scaling

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")

TARGETS = ["q_proj", "v_proj", "down_proj"]
PER_DEVICE, ACCUMULATION, GRAD_STEPS = 4, 2, 3


def sft_trainer(model_folder, out, *, lora=None, dataset=None, **overrides):
    import datasets

    settings = dict(output_dir=str(out), per_device_train_batch_size=PER_DEVICE, gradient_accumulation_steps=ACCUMULATION,
                    max_steps=4, learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                    save_strategy="no", lr_scheduler_type="constant", max_length=64)
    settings.update(overrides)
    lora = lora or peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    return trl.SFTTrainer(model=model_folder, args=trl.SFTConfig(**settings), peft_config=lora,
                          train_dataset=dataset or datasets.Dataset.from_list(arithmetic_chats()))


def target_weights(model):
    """{layer name in the base model: its weight} of the LoRA-wrapped targets of a PEFT model, or of
    the target nn.Linear layers of a plain one."""
    inner = model.base_model.model if isinstance(model, peft.PeftModel) else model
    return {name: getattr(module, "base_layer", module).weight for name, module in inner.named_modules()
            if name.rsplit(".", 1)[-1] in TARGETS}


def training_step_gradient(trainer, steps):
    """Ḡ by the trainer's own code: ``training_step`` (its loss, scaling and backward) on the micro-batches
    of the first ``steps`` optimizer steps, the sums divided by ``steps``. The adapters' B is zero, so
    the base weights' gradients are the base model's."""
    weights = target_weights(trainer.model)
    for weight in weights.values():
        weight.requires_grad_(True)
    loader = trainer.get_train_dataloader()
    batches = iter(loader)
    for _ in range(steps):
        samples, num_items = trainer.get_batch_samples(batches, trainer.args.gradient_accumulation_steps, trainer.args.device)
        trainer.current_gradient_accumulation_steps = len(samples)
        for inputs in samples:
            with trainer.accelerator.autocast():  # as accelerate wraps the trained model's forward
                trainer.training_step(trainer.model, inputs, num_items)
    return {name: weight.grad / steps for name, weight in weights.items()}


def test_sft_trainer_estimates_the_gradient_its_own_training_step_takes(smol_chat_model, tmp_path):
    reference = training_step_gradient(sft_trainer(smol_chat_model, tmp_path / "reference"), GRAD_STEPS)
    trainer = sft_trainer(smol_chat_model, tmp_path / "gora")
    held = trainer.model
    weights = {name: weight.detach().clone() for name, weight in target_weights(trainer.model).items()}
    from gora_dist.integrations import prepare_trainer

    plan = prepare_trainer(trainer, GoRAConfig(target_modules=TARGETS, rank_ref=4, rank_min=2, rank_max=16, alpha=8.0,
                                               grad_steps=GRAD_STEPS, seed=0))
    assert trainer.model is held and isinstance(held, peft.PeftModel)  # the trainer's own PeftModel, plan inside
    assert plan.report.grad_steps == GRAD_STEPS * ACCUMULATION
    for name, grad in reference.items():
        layer = plan.report.layers[name]
        expected = float((weights[name] * grad).abs().mean())
        assert layer.importance == pytest.approx(expected, rel=1e-4), name
        b0, _ = gora_init_b(grad, plan.lora_a[name], gamma=plan.report.gamma,
                            scaling=rslora_scaling(8.0, layer.rank, True))
        torch.testing.assert_close(plan.lora_b[name], b0, rtol=1e-4, atol=1e-7)

    # the prompt is masked: every token's loss would give other importances
    everything = sft_trainer(smol_chat_model, tmp_path / "all", completion_only_loss=False)
    all_tokens = training_step_gradient(everything, GRAD_STEPS)
    changed = [abs(float((weights[n] * all_tokens[n]).abs().mean()) / plan.report.layers[n].importance - 1) for n in reference]
    assert min(changed) > 1e-3


def test_the_trainer_trains_and_saves_the_plan_as_its_peft_model(smol_chat_model, tmp_path, capsys):
    from gora_dist.integrations import prepare_trainer

    trainer = sft_trainer(smol_chat_model, tmp_path / "run", save_strategy="steps", save_steps=2)
    plan = prepare_trainer(trainer)  # GoRA's options from the LoraConfig: r=4 -> ranks in [2, 16], alpha 8
    said = capsys.readouterr().out
    assert f"GoRA: {len(plan.rank_map)} layers, ranks {min(plan.rank_map.values())}-" in said
    assert f"from {8 * ACCUMULATION} backward passes" in said
    config = plan.report.config
    assert (config.rank_ref, config.rank_min, config.rank_max, config.alpha) == (4, 2, 16, 8.0)
    assert sorted(config.target_modules) == sorted(TARGETS) and config.grad_steps == 8 * ACCUMULATION
    lora = trainer.model.peft_config["default"]
    assert lora.use_rslora and {k.replace("\\", ""): v for k, v in lora.rank_pattern.items()} == plan.rank_map

    # the first logged loss is the initialised model's on the first optimizer step's batches
    batches = iter(trainer.get_train_dataloader())
    samples, num_items = trainer.get_batch_samples(batches, ACCUMULATION, trainer.args.device)
    with torch.no_grad(), trainer.accelerator.autocast():  # TRL trains under bf16 autocast by default
        first = sum(float(trainer.compute_loss(trainer.model, trainer._prepare_inputs(s), num_items_in_batch=num_items))
                    for s in samples)
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".lora_" not in n}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[0] == pytest.approx(first, rel=1e-5)
    assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if ".lora_" not in n)

    # TRL saves it as any PEFT model; it loads with PEFT alone to the same logits
    trainer.save_model(str(tmp_path / "final"))
    saved = json.load(open(tmp_path / "final" / "adapter_config.json"))
    assert {k.replace("\\", ""): v for k, v in saved["rank_pattern"].items()} == plan.rank_map and saved["use_rslora"]
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(smol_chat_model),
                                            str(tmp_path / "final")).eval()
    trainer.model.eval()
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad(), trainer.accelerator.autocast():  # the trained forward runs under it
        torch.testing.assert_close(loaded(input_ids=ids).logits.float(), trainer.model(input_ids=ids).logits.float())

    # resumed from the step-2 checkpoint: the saved plan, no estimation, the same losses onwards
    # gora.json beside the Trainer's own PEFT adapter; no second adapter folder for its resume to load
    assert os.path.isfile(tmp_path / "run" / "checkpoint-2" / "gora.json")
    assert not os.path.exists(tmp_path / "run" / "checkpoint-2" / "gora_adapter")
    resumed = sft_trainer(smol_chat_model, tmp_path / "run", save_strategy="steps", save_steps=2,
                          resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    resumed.get_train_dataloader = None  # estimating would need it
    again = prepare_trainer(resumed)
    assert again.rank_map == plan.rank_map
    assert "the plan saved in the checkpoint (not estimated again)" in capsys.readouterr().out
    del resumed.get_train_dataloader
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    continued = [entry["loss"] for entry in resumed.state.log_history if "loss" in entry]
    assert continued[-2:] == pytest.approx(losses[-2:], rel=1e-5)


def test_a_pissa_run_offsets_the_base_saves_for_the_original_and_resumes(smol_chat_model, tmp_path):
    """prepare_trainer(trainer, initializer="pissa"): the LoraConfig's budget, PiSSA's factors, the base
    offset so the model computes what it did; every adapter the Trainer writes (checkpoints, save_model)
    is the rank-2r one for the original base and loads with PEFT alone to the trained logits; a run
    resumed from a checkpoint goes through the model's load_adapter and continues the losses."""
    from gora_dist.integrations import prepare_trainer

    trainer = sft_trainer(smol_chat_model, tmp_path / "run", save_strategy="steps", save_steps=2)
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        before = trainer.model(input_ids=ids).logits
    plan = prepare_trainer(trainer, initializer="pissa", grad_steps=1)
    assert plan.report.config.initializer == "pissa" and plan.report.config.rank_ref == 4
    with torch.no_grad():  # base - s·B0·A0 + s·B0·A0, in float32
        torch.testing.assert_close(trainer.model(input_ids=ids).logits, before, rtol=0, atol=1e-4)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-2"):
        saved = json.load(open(folder / "adapter_config.json"))
        assert {k.replace("\\", ""): v for k, v in saved["rank_pattern"].items()} == {
            name: 2 * rank for name, rank in plan.rank_map.items()}, folder
        assert saved["lora_alpha"] == pytest.approx(8 * 2 ** 0.5)
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(smol_chat_model),
                                            str(tmp_path / "final")).eval()
    trainer.model.eval()
    trained = trainer.model.get_base_model()  # LoRA layers in; not the forward accelerate wrapped in bf16 autocast
    with torch.no_grad():  # in float32: under autocast W and W - s·B0·A0 round differently
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=1e-5)

    checkpoint = str(tmp_path / "run" / "checkpoint-2")
    resumed = sft_trainer(smol_chat_model, tmp_path / "run", save_strategy="steps", save_steps=2,
                          resume_from_checkpoint=checkpoint)
    assert prepare_trainer(resumed, initializer="pissa").rank_map == plan.rank_map
    resumed.train(resume_from_checkpoint=checkpoint)
    continued = [entry["loss"] for entry in resumed.state.log_history if "loss" in entry]
    assert continued[-2:] == pytest.approx(losses[-2:], rel=1e-5)
    assert list(resumed.model.peft_config) == ["default"]  # the resume loaded no other adapter


class WeightedLoss(transformers.Trainer):
    """A Trainer whose loss counts the last position twice: GoRA must differentiate this one."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(input_ids=inputs["input_ids"]).logits[:, :-1].float()
        targets = inputs["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        weights = torch.ones_like(losses)
        weights[:, -1] = 2.0
        return (losses * weights).sum() / weights.sum()


def collate(examples):
    ids = torch.stack([torch.as_tensor(e["input_ids"]) for e in examples])
    return {"input_ids": ids, "labels": ids.clone()}


def test_a_trainers_own_collator_and_compute_loss_are_what_gora_differentiates(tmp_path):
    from test_trainer_integration import TokenDataset

    from gora_dist.integrations import prepare_trainer

    def trainer(out):
        args = transformers.TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=2,
                                              gradient_accumulation_steps=2, report_to=[], use_cpu=True, seed=0,
                                              save_strategy="no")
        return WeightedLoss(model=tiny_llama(), args=args, train_dataset=TokenDataset(), data_collator=collate)

    reference = training_step_gradient(trainer(tmp_path / "reference"), 2)
    gora = trainer(tmp_path / "gora")
    weights = {name: weight.detach().clone() for name, weight in target_weights(gora.model).items()}
    plan = prepare_trainer(gora, GoRAConfig(target_modules=TARGETS, grad_steps=2))
    assert type(gora.model.model.layers[0].self_attn.q_proj).__name__ == "GoRALinear"  # GoRA's own layers
    for name, grad in reference.items():
        assert plan.report.layers[name].importance == pytest.approx(float((weights[name] * grad).abs().mean()), rel=1e-4)


@pytest.mark.parametrize("change, message", [
    (dict(lora=dict(use_dora=True)), "LoraConfig.use_dora=True: GoRA cannot express it"),
    (dict(lora=dict(rank_pattern={"q_proj": 8})), "LoraConfig.rank_pattern="),
    (dict(lora=dict(init_lora_weights="pissa")), "LoraConfig.init_lora_weights='pissa'"),
    (dict(lora=dict(init_lora_weights="pissa")), "call prepare_trainer(trainer, initializer='pissa' or 'lora_ga')"),
    (dict(config=dict(target_modules=["nope"])), "no module matches target_modules=('nope',); the model's nn.Linear "
                                                "modules are named ['down_proj', 'gate_proj', 'k_proj', 'lm_head', "
                                                "'o_proj', 'q_proj', 'up_proj', 'v_proj']"),
    (dict(config=dict(target_modules=TARGETS, grad_steps=50)),
     "the trainer's dataloader has 24 micro-batches on this rank; GoRA needs 100 (grad_steps=50 optimizer steps x 2"),
    (dict(trained=True), "the trainer has trained 1 steps already"),
    (dict(resume="nowhere"), "resume_from_checkpoint=nowhere: no gora.json there (nor in gora_adapter/)"),
    (dict(options=dict(initialiser="pissa")), "prepare_trainer: ['initialiser'] are not GoRAConfig fields"),
    (dict(options=dict(initializer="pisa")), "initializer='pisa' is not one of ['gora', 'lora_ga', 'lora_one', 'pissa']"),
])
def test_bad_input_is_refused_before_any_estimation(smol_chat_model, tmp_path, change, message):
    from gora_dist.integrations import prepare_trainer

    lora = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "task_type": "CAUSAL_LM",
                              **change.get("lora", {})})
    overrides = {"resume_from_checkpoint": change["resume"]} if "resume" in change else {}
    trainer = sft_trainer(smol_chat_model, tmp_path, lora=lora, **overrides)
    if change.get("trained"):
        trainer.state.global_step = 1
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    config = GoRAConfig(**change["config"]) if "config" in change else None
    with pytest.raises(ValueError) as raised:
        prepare_trainer(trainer, config, **change.get("options", {}))
    assert message in str(raised.value)
    after = dict(trainer.model.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)  # untouched
