"""LoRA-GA, LoRA-One and PiSSA's initial adapters (gora_dist/method/initializers.py) against PEFT
0.21's own (LoRA-GA, PiSSA) and against LoRA-One's reference formula on a float64 probe.

Tolerances: PEFT decomposes in float32, we in float64 here; on layers this small PEFT's
``svd_lowrank`` (q = min(4r, min(out, in))) spans the whole range, so both are exact SVDs and agree
to float32 rounding over the singular-value gaps (1e-4 relative). Singular vectors are defined up to
a sign per triplet: factors are compared row by row (A) and column by column (B) up to that sign."""

import json
import math
import os
import sys

import pytest
import torch
import torch.nn as nn

from gora_dist.method.initializers import (
    base_offset,
    lora_ga_factors,
    lora_one_factors,
    pissa_factors,
    shard_base_offset,
)
from gora_dist.method.shards import FlatShard

peft = pytest.importorskip("peft")


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 40, bias=False)
        self.down = nn.Linear(40, 10, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def model_and_batches():
    torch.manual_seed(0)
    model = TwoLayers()
    batches = [(torch.randn(6, 12), torch.randn(6, 10)) for _ in range(3)]
    return model, batches


def loss_of(model, batch):
    inputs, targets = batch
    return ((model(inputs) - targets) ** 2).mean()


def mean_gradients(model, batches):
    """Ḡ per layer in float64: the mean over the batches of each batch's gradient (PEFT's and ours)."""
    model = model.double()
    grads = {}
    for batch in batches:
        model.zero_grad()
        loss_of(model, tuple(t.double() for t in batch)).backward()
        for name in ("up", "down"):
            grads[name] = grads.get(name, 0) + getattr(model, name).weight.grad / len(batches)
    model.float().zero_grad(set_to_none=True)
    return grads


def assert_equal_up_to_sign(ours, theirs, rows: bool, tolerance: float = 1e-4) -> torch.Tensor:
    """Each row (rows=True) or column of ``ours`` equals ``theirs`` up to one sign, to ``tolerance``
    relative; returns the signs that align ours with theirs."""
    ours, theirs = (ours, theirs) if rows else (ours.T, theirs.T)
    signs = []
    for mine, other in zip(ours.detach().double(), theirs.detach().double()):
        signs.append(1.0 if float(mine @ other) >= 0 else -1.0)
        assert float(torch.linalg.norm(signs[-1] * mine - other) / torch.linalg.norm(other)) < tolerance
    return torch.tensor(signs)


@pytest.mark.parametrize("use_rslora", [True, False])
def test_pissa_gives_peft_factors_and_residual(use_rslora):
    model, _ = model_and_batches()
    weights = {name: getattr(model, name).weight.detach().clone() for name in ("up", "down")}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights="pissa",
                             use_rslora=use_rslora)
    wrapped = peft.get_peft_model(model, config)
    scaling = 8 / math.sqrt(4) if use_rslora else 8 / 4
    for name, weight in weights.items():
        layer = getattr(wrapped.base_model.model, name)
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        lora_a, lora_b = pissa_factors(u, s, vh, 4, scaling)
        assert_equal_up_to_sign(lora_a, layer.lora_A["default"].weight, rows=True)
        assert_equal_up_to_sign(lora_b, layer.lora_B["default"].weight, rows=False)
        residual = weight + base_offset(lora_a, lora_b, scaling)
        torch.testing.assert_close(residual, layer.base_layer.weight, rtol=0, atol=1e-5)
        torch.testing.assert_close(residual + scaling * lora_b @ lora_a, weight, rtol=0, atol=1e-5)


def test_lora_ga_gives_peft_factors_and_offset():
    model, batches = model_and_batches()
    weights = {name: getattr(model, name).weight.detach().clone() for name in ("up", "down")}
    grads = mean_gradients(model, batches)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig())

    def train_step():
        for batch in batches:
            loss_of(model, batch).backward()

    from peft.tuners.lora.loraga import preprocess_loraga

    preprocess_loraga(model, config, train_step)
    wrapped = peft.get_peft_model(model, config)
    scaling = 8 / 4
    for name, weight in weights.items():
        layer = getattr(wrapped.base_model.model, name)
        u, s, vh = torch.linalg.svd(grads[name], full_matrices=False)
        lora_a, lora_b = lora_ga_factors(u, s, vh, 4)
        assert_equal_up_to_sign(lora_a, layer.lora_A["default"].weight, rows=True)
        assert_equal_up_to_sign(lora_b, layer.lora_B["default"].weight, rows=False)
        # the offset from PEFT's own factors: the base it leaves is W − s·B0·A0
        peft_a, peft_b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        torch.testing.assert_close(layer.base_layer.weight, weight + base_offset(peft_a, peft_b, scaling),
                                   rtol=0, atol=1e-5)
        # and ours moves it by as much (the product of factors whose signs differ differs in sign only)
        assert float(torch.linalg.norm(base_offset(lora_a, lora_b, scaling))) == pytest.approx(
            float(torch.linalg.norm(base_offset(peft_a, peft_b, scaling))), rel=1e-4)


def test_lora_one_is_one_descent_step_on_the_best_rank_r_gradient():
    """The reference formula on a float64 probe: s·B0·A0 = −(s/(γσ₁))·[Ḡ]_r, the triplets of −Ḡ in
    both factors, each factor carrying √S/√(σ₁γ); no base offset."""
    torch.manual_seed(1)
    grad = torch.randn(20, 14, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(-grad, full_matrices=False)
    lora_a, lora_b = lora_one_factors(u, s, vh, 3, gamma=128.0)
    scaling = 16 / math.sqrt(3)
    g_u, g_s, g_vh = torch.linalg.svd(grad, full_matrices=False)
    best = g_u[:, :3] @ torch.diag(g_s[:3]) @ g_vh[:3]
    expected = -(scaling / (128.0 * float(g_s[0]))) * best
    torch.testing.assert_close((scaling * lora_b.double() @ lora_a.double()), expected, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(torch.linalg.norm(lora_a.double(), dim=1),
                               torch.sqrt(s[:3] / (s[0] * 128.0)), rtol=1e-6, atol=0)
    zero_a, zero_b = lora_one_factors(u, torch.zeros_like(s), vh, 3)
    assert not zero_a.any() and not zero_b.any()


def test_a_shard_offsets_only_its_own_elements():
    torch.manual_seed(2)
    lora_a, lora_b = torch.randn(3, 7), torch.randn(5, 3)
    full = base_offset(lora_a, lora_b, 2.0).reshape(-1)
    for shard in (FlatShard(4, 23, 5, 7), FlatShard(7, 21, 5, 7), FlatShard(9, 9, 5, 7), FlatShard.whole(5, 7)):
        torch.testing.assert_close(shard_base_offset(lora_a, lora_b, 2.0, shard), full[shard.start:shard.stop])


def test_too_few_triplets_are_named():
    u, s, vh = torch.linalg.svd(torch.randn(6, 5), full_matrices=False)
    with pytest.raises(ValueError, match=r"lora_ga: needs 6 singular triplets, got 5"):
        lora_ga_factors(u, s, vh, 3)


# --- through the pipeline (one process; the sharded runs are the distributed tests') -------------

TARGETS = ["q_proj", "v_proj", "down_proj"]


def peft_llama(init, batches=None):
    """PEFT's own init of the tiny Llama at r = 12 on TARGETS (LoRA-GA from the same batches). At
    r = 12 PEFT's svd_lowrank (q = min(4r, min(out, in))) spans every layer's whole range, so its
    SVD is exact too; at r = 4 (q = 16 of 48) its own approximation differs by ~1e-3 here."""
    from conftest import tiny_llama

    model = tiny_llama()
    config = peft.LoraConfig(r=12, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, use_rslora=True,
                             lora_ga_config=peft.LoraGAConfig() if init == "lora_ga" else None)
    if init == "lora_ga":
        from peft.tuners.lora.loraga import preprocess_loraga

        def train_step():
            for batch in batches:
                model(**batch).loss.backward()

        preprocess_loraga(model, config, train_step)
    return peft.get_peft_model(model, config)


def ours(initializer, batches, svd="exact", rank=12):
    from conftest import tiny_llama
    from gora_dist import GoRAConfig, apply_gora, gora_modules

    model = tiny_llama()
    original = {name: param.detach().clone() for name, param in model.named_parameters()}
    config = GoRAConfig(target_modules=TARGETS, allocator="uniform", rank_ref=rank, rank_min=1, alpha=8,
                        initializer=initializer, svd=svd, grad_steps=len(batches))
    report = apply_gora(model, batches, config)
    return model, dict(gora_modules(model)), original, report


@pytest.mark.parametrize("initializer", ["pissa", "lora_ga"])
def test_pipeline_gives_peft_initial_weights(initializer):
    """Every adapted layer: the adapter's factors equal PEFT's up to each triplet's sign (1e-4; the two
    Ḡ are equal), the
    base after the offset equals PEFT's once those signs are aligned (1e-5; LoRA-GA's B0 and A0 take
    different triplets, so its product, unlike PiSSA's, depends on them), and base + s·B0·A0 is the
    original weight (the model's output unchanged at step 0)."""
    from conftest import lm_batches

    batches = lm_batches(3)
    model, adapters, original, report = ours(initializer, batches)
    reference = peft_llama(initializer, batches).base_model.model
    assert set(report.rank_map.values()) == {12}
    for name, adapter in adapters.items():
        theirs = reference.get_submodule(name)
        signs_a = assert_equal_up_to_sign(adapter.lora_A, theirs.lora_A["default"].weight, rows=True)
        signs_b = assert_equal_up_to_sign(adapter.lora_B, theirs.lora_B["default"].weight, rows=False)
        with torch.no_grad():
            aligned = adapter.scaling * (adapter.lora_B * signs_b) @ (signs_a[:, None] * adapter.lora_A)
            torch.testing.assert_close(original[f"{name}.weight"] - aligned, theirs.base_layer.weight, rtol=0, atol=1e-5)
        if initializer == "pissa":  # sign-free: the bases themselves agree
            torch.testing.assert_close(adapter.base.weight, theirs.base_layer.weight, rtol=0, atol=1e-5)
        effective = adapter.base.weight + adapter.scaling * adapter.lora_B @ adapter.lora_A
        torch.testing.assert_close(effective, original[f"{name}.weight"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("svd, tolerance", [("exact", 1e-5), ("randomized", 1e-2)])
def test_pipeline_lora_one_is_a_step_on_the_best_rank_r_gradient(svd, tolerance):
    """LoRA-One through the pipeline: the base untouched, s·B0·A0 = −(s/(γσ₁))·[Ḡ]_r with Ḡ the mean of
    the batches' gradients (float64 reference); the randomized SVD (p = 8, q = 4) within 1 %."""
    from conftest import lm_batches
    from test_apply import per_batch_mean_gradient

    from gora_dist.model.targets import find_target_modules

    batches = lm_batches(3)
    from conftest import tiny_llama

    grads = per_batch_mean_gradient(tiny_llama(), batches, list(find_target_modules(tiny_llama(), TARGETS)))
    model, adapters, original, _ = ours("lora_one", batches, svd, rank=4)
    for name, adapter in adapters.items():
        assert torch.equal(adapter.base.weight, original[f"{name}.weight"])
        u, s, vh = torch.linalg.svd(grads[name], full_matrices=False)
        expected = -(adapter.scaling / (128.0 * float(s[0]))) * (u[:, :4] * s[:4]) @ vh[:4]
        got = adapter.scaling * adapter.lora_B.double() @ adapter.lora_A.double()
        assert float(torch.linalg.norm(got - expected) / torch.linalg.norm(expected)) < tolerance, name


def test_pissa_with_uniform_ranks_draws_no_batch():
    """PiSSA reads only W: with uniform ranks no batch is drawn and no backward runs, and the adapters
    are the ones made after gradient steps; with GoRA's ranks PiSSA still needs the batches."""
    from conftest import lm_batches, tiny_llama

    from gora_dist import GoRAConfig, apply_gora, gora_modules

    def untouchable():
        raise AssertionError("a batch was drawn")
        yield

    _, adapters, _, _ = ours("pissa", lm_batches(2))  # the same options, after 2 gradient steps
    model = tiny_llama()
    config = GoRAConfig(target_modules=TARGETS, allocator="uniform", rank_ref=12, rank_min=1, alpha=8,
                        initializer="pissa", svd="exact", grad_steps=2)
    report = apply_gora(model, untouchable(), config)
    assert report.grad_steps == 0 and any("no gradient steps" in note for note in report.notes)
    assert all(param.grad is None for param in model.parameters())
    for name, adapter in gora_modules(model):
        torch.testing.assert_close(adapter.lora_A, adapters[name].lora_A, rtol=0, atol=0)
        torch.testing.assert_close(adapter.base.weight, adapters[name].base.weight, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="a batch was drawn"):
        apply_gora(tiny_llama(), untouchable(), GoRAConfig(target_modules=TARGETS, initializer="pissa", grad_steps=2))


def test_initializer_bad_input_is_named():
    from conftest import lm_batches, tiny_llama

    from gora_dist import GoRAConfig, apply_gora

    with pytest.raises(ValueError, match=r"initializer='lora_gb' is not one of \['gora', 'lora_ga', 'lora_one', 'pissa'\]"):
        GoRAConfig(initializer="lora_gb")
    # k/v are 48 -> 24: LoRA-GA at rank 16 needs 32 triplets
    config = GoRAConfig(target_modules=["k_proj"], allocator="uniform", rank_ref=16, initializer="lora_ga", grad_steps=1)
    with pytest.raises(ValueError, match=r"needs 2 x rank <= min\(out, in\).*model.layers.0.self_attn.k_proj \(rank 16, weight 24x48\)"):
        apply_gora(tiny_llama(), lm_batches(1), config)
    from gora_dist.model.base_offset import check_offset_bases

    quantised = nn.Module()
    quantised.layer = nn.Module()
    quantised.layer.weight = torch.zeros(4, 4, dtype=torch.int8)  # as a quantised base holds it
    with pytest.raises(ValueError, match=r"layer: the base weight is torch.int8; initializer=pissa rewrites it"):
        check_offset_bases(quantised, {"layer": None}, "pissa")


@pytest.mark.parametrize("initializer", ["pissa", "lora_ga"])
def test_a_trained_offset_adapter_loads_on_the_original_base(initializer, tmp_path):
    """Trained a few steps from a PiSSA or LoRA-GA init, the adapter save_adapter writes is the rank-2r
    conversion: PEFT's PeftModel.from_pretrained on the unmodified base gives the trained model's
    logits, and so does load_plan + apply_plan on a fresh base (a resume: offset by A0/B0, trained
    A/B installed), and so does to_peft of that plan, whose own save_pretrained and load_adapter keep
    to the original base."""
    from conftest import lm_batches, tiny_llama

    from gora_dist import to_peft
    from gora_dist.model.adapter_io import load_plan, save_adapter
    from gora_dist.pipeline.apply import apply_plan

    model, adapters, _, report = ours(initializer, lm_batches(2), rank=4)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for batch in lm_batches(3, seed=7):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    probe = lm_batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        trained = model(input_ids=probe).logits
    save_adapter(model, str(tmp_path / "adapter"), report)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {8} and config["lora_alpha"] == pytest.approx(8 * math.sqrt(2))

    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=probe).logits, trained, rtol=0, atol=1e-5)
    plan = load_plan(str(tmp_path / "adapter"))
    assert plan.rank_map == report.rank_map
    fresh = tiny_llama()
    apply_plan(fresh, plan)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=probe).logits, trained, rtol=0, atol=1e-5)
    # to_peft of the read-back plan: PEFT's layers on the base offset by A0/B0, the trained model again;
    # its own save_pretrained writes the adapter for the original base (staged, converted, moved in)
    peft_model = to_peft(tiny_llama(), plan)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=probe).logits, trained, rtol=0, atol=1e-5)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    assert sorted(os.listdir(tmp_path / "peft")) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                      "gora.json"]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".gora-save-")]  # no staging left
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"] == config["rank_pattern"]
    again = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=probe).logits, trained, rtol=0, atol=1e-5)
    # load_adapter of that folder back into the offset PEFT model (what the Trainer's resume calls)
    fresh_peft = to_peft(tiny_llama(), plan.with_adapters({n: (plan.initial(n)[0], plan.initial(n)[1]) for n in plan.lora_a}))
    fresh_peft.load_adapter(str(tmp_path / "peft"), "default", is_trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh_peft(input_ids=probe).logits, trained, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="safetensors only"):
        peft_model.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)


def test_the_launcher_trains_resumes_and_ships_a_pissa_adapter(sft_folder, tmp_path):
    """--gora.initializer pissa: a run interrupted at its step-3 checkpoint and resumed ends where the
    uninterrupted one does (the resume offsets the base by the checkpoint's A0/B0 and installs its
    trained A/B), and the final adapter on the unmodified base in PEFT gives our model's logits."""
    import shutil

    from gora_dist.launcher.runner import main
    from gora_dist.model.adapter_io import load_plan
    from gora_dist.launcher.models import load_model
    from gora_dist.pipeline.apply import apply_plan

    data, folder = sft_folder

    def run(out, *extra):
        main(["--model", folder, "--task", "sft", "--data", data, "--output-dir", str(out), "--train-examples", "64",
              "--eval-examples", "4", "--gora.grad_steps", "1", "--max-new-tokens", "2", "--steps", "6",
              "--checkpoint-every", "3", "--gora.initializer", "pissa", "--gora.svd", "exact", *extra])

    run(tmp_path / "whole")
    run(tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "adapter")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-000006")
    run(tmp_path / "cut", "--resume")
    whole, cut = load_plan(str(tmp_path / "whole" / "adapter")), load_plan(str(tmp_path / "cut" / "adapter"))
    for name in whole.lora_a:
        for a, b in ((whole.lora_a, cut.lora_a), (whole.lora_b, cut.lora_b), (whole.initial_a, cut.initial_a)):
            assert float(torch.linalg.norm(a[name] - b[name]) / torch.linalg.norm(a[name])) < 1e-4, name

    ids = torch.tensor([[5, 17, 33, 2, 40, 41, 9]])
    ours_model = load_model(folder)
    apply_plan(ours_model, whole)
    loaded = peft.PeftModel.from_pretrained(load_model(folder), str(tmp_path / "whole" / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours_model(input_ids=ids).logits, rtol=0, atol=1e-5)


# --- world 2: FSDP2, ZeRO-3 and DDP against one process (one spawn for every engine and case) ------

def test_sharded_initializers_equal_one_process_and_no_rank_holds_a_full_target(tmp_path):
    """tests/dist/init_worker.py at world 2, FSDP2, ZeRO-3 and DDP (MLP 191 wide: a ZeRO-3 partition cuts
    a row), and LoRA-GA at GoRA's ranks under ZeRO-3: for LoRA-GA, LoRA-One and PiSSA the rank map is
    one process's, the effective initial weights are the original ones (LoRA-GA, PiSSA: to 1e-5) or one
    process's (LoRA-One), and each rank's base offset equals one process's to 1e-3 relative (the same
    seeded Ω, sums in another order, power iterations). During every layer's SVD a rank passed in only
    its shard (DDP too: it takes an even partition of the gradient every rank holds) and no operation
    created a tensor as large as the layer's weight."""
    import shutil
    import subprocess

    from safetensors.torch import load_file

    pytest.importorskip("deepspeed")
    sys_path = os.path.join(os.path.dirname(__file__), "dist")
    sys.path.insert(0, sys_path)
    from init_worker import CASES, GLOBAL_BATCH, GRAD_STEPS, WIDTH, case_key, config_for

    from conftest import lm_batches, tiny_llama
    from gora_dist import apply_gora, gora_modules

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [shutil.which("torchrun") or "torchrun", "--standalone", "--nproc_per_node", "2",
               os.path.join(sys_path, "init_worker.py"), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    facts = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    original = dict(tiny_llama(intermediate_size=WIDTH).named_parameters())
    single = {}
    for engine, initializer, allocator in CASES:
        if (initializer, allocator) not in single:
            model = tiny_llama(intermediate_size=WIDTH)
            report = apply_gora(model, lm_batches(GRAD_STEPS, batch_size=GLOBAL_BATCH), config_for(initializer, allocator))
            single[initializer, allocator] = report, dict(gora_modules(model))
        report, adapters = single[initializer, allocator]
        key = case_key(engine, initializer, allocator)
        if allocator == "gora":
            assert len(set(report.rank_map.values())) > 1, report.rank_map  # the case is about unequal ranks
        tensors = load_file(tmp_path / f"{key}.safetensors")
        for fact in facts:
            assert fact[key]["rank_map"] == report.rank_map, key
            assert set(fact[key]["svd"]) == set(report.rank_map), key  # every layer's SVD was watched
            for name, svd in fact[key]["svd"].items():
                assert svd["input_elements"] <= svd["full_elements"] // 2 + 48, (key, name, svd)
                assert svd["largest_created"] < svd["full_elements"], (key, name, svd)
        for name, adapter in adapters.items():
            weight = original[f"{name}.weight"].detach()
            one_offset = adapter.base.weight.detach() - weight
            two_offset = tensors[f"{name}.base"] - weight
            one_update = adapter.scaling * adapter.lora_B.detach() @ adapter.lora_A.detach()
            if initializer == "lora_one":
                assert torch.equal(tensors[f"{name}.base"], weight), (key, name)
                difference = torch.linalg.norm(tensors[f"{name}.effective"] - weight - one_update)
                assert float(difference / torch.linalg.norm(one_update)) < 1e-3, (key, name)
            else:
                torch.testing.assert_close(tensors[f"{name}.effective"], weight, rtol=0, atol=1e-5)
                difference = torch.linalg.norm(two_offset - one_offset) / torch.linalg.norm(one_offset)
                assert float(difference) < 1e-3, (key, name, float(difference))
