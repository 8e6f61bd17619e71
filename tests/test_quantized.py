"""GoRA on a bitsandbytes-quantised base (QLoRA) on one process. A 4-bit layer's weight gets no
gradient, so GoRA takes gᵀx from each layer's own backward (engines/output_tap): Ḡ, the importances
and B0 must equal those of the same model in float32 with the dequantised weights, with and without
gradient checkpointing; the plan must give the dense model's logits through GoRA's layers and through
PEFT's bnb LoRA layers, save and load on the 4-bit base, and run in TRL's QLoRA. What cannot work on a
quantised base is refused by name. World 2 (DDP): tests/test_distributed.py."""

import pytest
import torch
import torch.nn as nn

from conftest import QUANT_TARGETS, dequantized_twin, lm_batches, load_quantized, save_quantizable_llama
from gora_dist import GoRAConfig

bitsandbytes = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

CONFIG = GoRAConfig(target_modules=QUANT_TARGETS, rank_ref=4, rank_min=2, rank_max=12, grad_steps=3, gamma=0.2, seed=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_quantizable_llama(str(tmp_path_factory.mktemp("quantizable")))


def batches():
    return lm_batches(CONFIG.grad_steps, batch_size=2, length=12)


def estimated(model, config=CONFIG):
    """(Ḡ per layer as (out, in), the plan) from the local engine."""
    from gora_dist.engines.base import LocalEngine
    from gora_dist.pipeline.estimation import estimate_gradients
    from gora_dist.pipeline.plan import build_plan

    engine = LocalEngine(model, config.target_modules)
    try:
        accumulator, _, _ = estimate_gradients(engine, iter(batches()), config)
        means = {name: accumulator.mean(name).view(engine.shard(name).rows, -1) for name in engine.targets}
        plan = build_plan(engine, iter(batches()), config)
    finally:
        engine.close()
    return means, plan


def packed_weights(model):
    """Every parameter's bytes (bf16-stored 4-bit weights hold NaN bit patterns, which torch.equal rejects)."""
    return {name: param.detach().reshape(-1).view(torch.uint8).clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize("kind, storage, checkpointing", [
    ("nf4", None, None), ("nf4", None, "reentrant"), ("fp4", torch.bfloat16, "non-reentrant")])
def test_the_gradient_of_a_4bit_model_is_the_dense_models_with_its_weights(folder, kind, storage, checkpointing):
    quantized = load_quantized(folder, kind, storage)
    dense = dequantized_twin(quantized, folder)
    if checkpointing is not None:
        quantized.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
        quantized.disable_input_require_grads()  # as in a model checkpointed by hand: GoRA's own tap must cope
        quantized.train()
    before = packed_weights(quantized)
    flags = {name: param.requires_grad for name, param in quantized.named_parameters()}

    grads, plan = estimated(quantized)
    dense_grads, dense_plan = estimated(dense)
    for name, grad in dense_grads.items():  # float32 on both sides: the same products, summed alike
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-8)
        assert plan.report.layers[name].importance == pytest.approx(dense_plan.report.layers[name].importance, rel=1e-5)
        torch.testing.assert_close(plan.lora_b[name], dense_plan.lora_b[name], rtol=1e-5, atol=1e-8)
    assert plan.rank_map == dense_plan.rank_map and len(set(plan.rank_map.values())) > 1

    # the base untouched, nothing holds a gradient, requires_grad as it was
    after = packed_weights(quantized)
    assert all(torch.equal(after[name], value) for name, value in before.items())
    assert all(param.grad is None for param in quantized.parameters())
    assert {name: param.requires_grad for name, param in quantized.named_parameters()} == flags


def test_a_plain_module_mixing_4bit_and_float_targets_gets_every_gradient_through_a_loss_fn():
    # no input embeddings to make the graph start (GoRA's own leaf does), one float target among them
    import copy

    from gora_dist.model.quantized import dequantized_weight

    torch.manual_seed(0)
    layers = [bitsandbytes.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4"), nn.ReLU(),
              nn.Linear(64, 64), nn.ReLU(), bitsandbytes.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")]
    quantized = nn.Sequential(*layers).to("cpu")  # bitsandbytes quantises on the move
    dense = nn.Sequential(*[copy.deepcopy(layer) if isinstance(layer, (nn.ReLU,)) or type(layer) is nn.Linear
                            else nn.Linear(layer.in_features, layer.out_features) for layer in layers])
    with torch.no_grad():
        for index in (0, 4):
            dense[index].weight.copy_(dequantized_weight(quantized[index]))
            dense[index].bias.copy_(quantized[index].bias)
    inputs = [torch.randn(5, 64, generator=torch.Generator().manual_seed(step)) for step in range(3)]
    config = GoRAConfig(target_modules=["0", "2", "4"], rank_ref=4, rank_min=2, rank_max=8, grad_steps=3)

    def loss_fn(model, x):
        return model(x).square().mean()

    from gora_dist.engines.base import LocalEngine
    from gora_dist.pipeline.estimation import estimate_gradients

    means = []
    for model in (quantized, dense):
        engine = LocalEngine(model, config.target_modules)
        try:
            accumulator, _, _ = estimate_gradients(engine, iter(inputs), config, loss_fn=loss_fn)
            means.append({name: accumulator.mean(name) for name in engine.targets})
        finally:
            engine.close()
    for name in ("0", "2", "4"):
        assert float(means[1][name].norm()) > 0
        torch.testing.assert_close(means[0][name], means[1][name], rtol=1e-5, atol=1e-8)


def test_an_8bit_model_gives_the_dense_plan_up_to_its_quantised_activations(folder):
    # LLM.int8 also rounds the activations to int8 in its forward, so its gradients are those of a
    # slightly different function: equal to the dense twin's within about 1e-2, not to rounding
    quantized = load_quantized(folder, "int8")
    dense = dequantized_twin(quantized, folder)
    grads, plan = estimated(quantized)
    dense_grads, dense_plan = estimated(dense)
    for name, grad in dense_grads.items():
        assert float(torch.linalg.norm(grads[name] - grad) / torch.linalg.norm(grad)) < 5e-2, name
    agreeing = sum(plan.rank_map[n] == dense_plan.rank_map[n] for n in plan.rank_map)
    assert agreeing >= len(plan.rank_map) - 2


@pytest.mark.parametrize("changes", [dict(allocator="gelora", rank_ref=4), dict(initializer="lora_one")],
                         ids=["gelora", "lora_one"])
def test_gelora_and_lora_one_plan_a_4bit_model_as_its_dense_twin(folder, changes):
    import dataclasses

    config = dataclasses.replace(CONFIG, **changes)
    quantized = load_quantized(folder)
    _, plan = estimated(quantized, config)
    _, dense_plan = estimated(dequantized_twin(quantized, folder), config)
    assert plan.rank_map == dense_plan.rank_map
    for name in dense_plan.lora_b:
        torch.testing.assert_close(plan.lora_a[name], dense_plan.lora_a[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(plan.lora_b[name], dense_plan.lora_b[name], rtol=1e-4, atol=1e-6)


def test_the_plan_on_the_4bit_base_computes_the_dense_models_function_and_loads_in_peft(folder, tmp_path):
    from gora_dist import merge_adapters, save_adapter, to_peft
    from gora_dist.pipeline.apply import apply_plan
    from gora_dist.pipeline.sharded import estimate_plan

    quantized = load_quantized(folder)
    dense = dequantized_twin(quantized, folder)
    plan = estimate_plan(quantized, batches(), CONFIG, engine="local")
    apply_plan(dense, plan)
    ids = torch.tensor([[3, 17, 42, 8, 66, 5]])
    with torch.no_grad():
        expected = dense(input_ids=ids).logits

    as_peft = to_peft(load_quantized(folder), plan).eval()  # PEFT's bnb LoRA layers
    assert type(as_peft.base_model.model.model.layers[0].self_attn.q_proj).__module__.startswith("peft.tuners.lora.bnb")
    with torch.no_grad():
        torch.testing.assert_close(as_peft(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    as_peft.save_pretrained(str(tmp_path / "peft"))

    apply_plan(quantized, plan)  # GoRA's own layers around the bnb layers
    with torch.no_grad():
        torch.testing.assert_close(quantized(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    save_adapter(quantized, str(tmp_path / "gora"), plan.report)
    with pytest.raises(ValueError, match="the base is quantised; merging would re-quantise it"):
        merge_adapters(quantized)

    for saved in ("peft", "gora"):  # either file loads with PEFT alone on a fresh 4-bit base
        loaded = peft.PeftModel.from_pretrained(load_quantized(folder), str(tmp_path / saved)).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


class QuantLinear(nn.Module):  # what GPTQ's layers look like to us: a module of a quantisation library
    __module__ = "auto_gptq.nn_modules.qlinear.qlinear_cuda"

    def __init__(self):
        super().__init__()
        self.qweight = nn.Parameter(torch.zeros(8, 64, dtype=torch.int32), requires_grad=False)


def test_what_cannot_run_on_a_quantised_base_is_refused_by_name(folder):
    from gora_dist import apply_gora, find_target_modules
    from gora_dist.engines.choice import make_engine

    quantized = load_quantized(folder)
    for initializer in ("lora_ga", "pissa"):
        config = GoRAConfig(target_modules=QUANT_TARGETS, initializer=initializer, allocator="uniform", grad_steps=1)
        with pytest.raises(ValueError, match=f"initializer={initializer} offsets the base weights .* model.layers.0.self_attn.q_proj"
                                             r" and 13 more is quantised \(bitsandbytes 4-bit\).*'gora' or 'lora_one'"):
            apply_gora(quantized, batches(), config)
    with pytest.raises(ValueError, match="q_proj is a quantised layer .* engine is ZeRO-3"):
        make_engine("zero3", quantized, CONFIG)
    with pytest.raises(ValueError, match="q_proj is a quantised layer .bitsandbytes 8-bit. and the estimation engine is "
                                         "FSDP2: an 8-bit layer keeps its scales"):
        make_engine("fsdp2", load_quantized(folder, "int8"), CONFIG)

    quantized.model.layers[0].mlp.up_proj = QuantLinear()
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj is a QuantLinear \(GPTQ \(auto-gptq\) quantisation\)"):
        find_target_modules(quantized, QUANT_TARGETS)
    integer = nn.Linear(64, 128)
    integer.weight = nn.Parameter(torch.zeros(128, 64, dtype=torch.int8), requires_grad=False)
    quantized.model.layers[0].mlp.up_proj = integer
    with pytest.raises(ValueError, match="up_proj: an nn.Linear with a torch.int8 weight"):
        find_target_modules(quantized, QUANT_TARGETS)


def test_trl_qlora_with_prepare_trainer_trains_and_its_adapter_loads_on_the_4bit_base(smol_chat_model, tmp_path):
    # TRL's sft.py --load_in_4bit --use_peft --gradient_checkpointing: a BitsAndBytesConfig in
    # model_init_kwargs; TRL casts the LoRA adapters to bfloat16 for a 4-bit model, GoRA's stay so
    import datasets
    import transformers
    trl = pytest.importorskip("trl")

    from conftest import arithmetic_chats
    from gora_dist.integrations import prepare_trainer

    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         max_steps=3, learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                         save_strategy="no", lr_scheduler_type="constant", max_length=64, gradient_checkpointing=True,
                         model_init_kwargs={"quantization_config": quantization})
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(model=smol_chat_model, args=args, peft_config=lora,
                             train_dataset=datasets.Dataset.from_list(arithmetic_chats()))
    dtypes = {p.dtype for n, p in trainer.model.named_parameters() if ".lora_" in n}
    plan = prepare_trainer(trainer, grad_steps=2)
    assert len(plan.rank_map) == 14 and len(set(plan.rank_map.values())) > 1
    assert {p.dtype for n, p in trainer.model.named_parameters() if ".lora_" in n} == dtypes == {torch.bfloat16}
    layer = trainer.model.base_model.model.model.layers[1].mlp.down_proj
    torch.testing.assert_close(layer.lora_B["default"].weight.float(), plan.lora_b["model.layers.1.mlp.down_proj"].to(torch.bfloat16).float())
    base = packed_weights(trainer.model)

    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = packed_weights(trainer.model)
    assert all(torch.equal(after[n], value) for n, value in base.items() if ".lora_" not in n)  # only adapters trained

    trainer.save_model(str(tmp_path / "final"))
    fresh = transformers.AutoModelForCausalLM.from_pretrained(smol_chat_model, quantization_config=quantization)
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "final")).eval()
    trainer.model.eval()
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad(), trainer.accelerator.autocast():
        torch.testing.assert_close(loaded(input_ids=ids).logits.float(), trainer.model(input_ids=ids).logits.float())


def test_the_launcher_trains_a_4bit_base_and_plans_it_as_its_dense_twin(tmp_path):
    # launch/train.py --quantization nf4 on a model folder; the same run on a float32 folder holding the
    # dequantised weights starts from the same plan (same batches, same seed); the final adapter
    # loads with PEFT on the 4-bit base
    import json
    import shutil

    from safetensors.torch import load_file

    from conftest import save_tiny_causal_lm, write_sft_records
    from gora_dist.launcher.runner import main

    folder = save_tiny_causal_lm(str(tmp_path / "model"))
    twin = str(tmp_path / "twin")
    dequantized_twin(load_quantized(folder), folder).save_pretrained(twin)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tmp_path / "model" / name).exists():
            shutil.copy(tmp_path / "model" / name, twin)
    data = write_sft_records(str(tmp_path / "animals.jsonl"), count=60)
    common = ["--task", "sft", "--data", data, "--eval-examples", "8", "--gora.grad_steps", "2", "--checkpoint-every", "0",
              "--max-new-tokens", "4", "--show-generations", "0", "--global-batch-size", "4"]
    main(["--model", folder, "--quantization", "nf4", "--steps", "2", "--output-dir", str(tmp_path / "q")] + common)
    main(["--model", twin, "--init-only", "--output-dir", str(tmp_path / "dense")] + common)

    quantized_init, dense_init = (json.loads((tmp_path / run / "init" / "gora.json").read_text()) for run in ("q", "dense"))
    assert {n: l["rank"] for n, l in quantized_init["layers"].items()} == {n: l["rank"] for n, l in dense_init["layers"].items()}
    got, expected = (load_file(tmp_path / run / "init" / "adapter_model.safetensors") for run in ("q", "dense"))
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-7)
    metrics = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert metrics["config"]["quantization"] == "nf4" and len(metrics["losses"]) == 2

    loaded = peft.PeftModel.from_pretrained(load_quantized(folder), str(tmp_path / "q" / "adapter")).eval()
    assert type(loaded.base_model.model.model.layers[0].mlp.up_proj).__module__.startswith("peft.tuners.lora.bnb")
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=torch.tensor([[5, 9, 13, 2]])).logits).all()


@pytest.mark.parametrize("options, message", [
    (["--quantization", "q3"], r"quantization='q3' is not one of \['none', 'nf4', 'fp4', 'int8'\]"),
    (["--quantization", "nf4", "--engine", "fsdp2"], "quantization=nf4 with engine=fsdp2: the launcher loads a quantised model whole"),
    (["--quantization", "int8", "--quant-storage", "bf16"], "quant_storage='bf16' is for 4-bit weights"),
    (["--quantization", "nf4", "--model", "tiny-llama"], "the tiny test models are built, not loaded"),
])
def test_the_launcher_refuses_what_a_quantised_base_cannot_do(tmp_path, options, message):
    from gora_dist.launcher.runner import main

    with pytest.raises(ValueError, match=message):
        main(["--task", "sft", "--data", "asdiv", "--output-dir", str(tmp_path / "out")] + options)
    assert not (tmp_path / "out").exists()


def test_a_zero3_run_of_a_4bit_model_loaded_whole_estimates_it_as_ddp_would(folder, monkeypatch):
    # transformers loads a quantised model outside zero.Init (QLoRA + ZeRO-3): nothing is partitioned,
    # so the Trainer integration estimates without ZeRO-3 (DDP at several ranks, local at one)
    import gora_dist.integrations.run_plan as run_plan

    monkeypatch.setattr(run_plan, "zero3_config", lambda args: {"zero_optimization": {"stage": 3}})
    monkeypatch.setattr(run_plan, "fsdp_version", lambda args, accelerator: None)
    monkeypatch.setattr(run_plan, "on_cpu", lambda args, accelerator: True)
    monkeypatch.setattr(run_plan, "rank_and_world", lambda: (0, 2))
    assert run_plan.run_engine(load_quantized(folder), args=None, accelerator=None) == ("ddp", {})
    dense = dequantized_twin(load_quantized(folder), folder)
    assert run_plan.run_engine(dense, args=None, accelerator=None)[0] == "zero3"
