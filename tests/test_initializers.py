"""LoRA-GA, LoRA-One and PiSSA's initial adapters (gora_dist/method/initializers.py) against PEFT
0.21's own (LoRA-GA, PiSSA) and against LoRA-One's reference formula on a float64 probe.

Tolerances: PEFT decomposes in float32, we in float64 here; on layers this small PEFT's
``svd_lowrank`` (q = min(4r, min(out, in))) spans the whole range, so both are exact SVDs and agree
to float32 rounding over the singular-value gaps (1e-4 relative). Singular vectors are defined up to
a sign per triplet: factors are compared row by row (A) and column by column (B) up to that sign."""

import math

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


def assert_equal_up_to_sign(ours, theirs, rows: bool):
    """Each row (rows=True) or column of ``ours`` equals ``theirs`` up to one sign, to 1e-4 relative."""
    ours, theirs = (ours, theirs) if rows else (ours.T, theirs.T)
    for mine, other in zip(ours.detach().double(), theirs.detach().double()):
        sign = 1.0 if float(mine @ other) >= 0 else -1.0
        assert float(torch.linalg.norm(sign * mine - other) / torch.linalg.norm(other)) < 1e-4


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
