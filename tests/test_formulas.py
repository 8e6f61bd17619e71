"""Each formula alone: importance, rank allocation, A0 seeding and the B0 solve (pure functions)."""

import math
import subprocess
import sys

import pytest
import torch

from gora_dist.method.allocation import (
    allocate_ranks,
    fit_to_budget,
    lora_param_count,
    lora_reference_count,
    rank_budget,
    round_rank,
)
from gora_dist.method.importance import abs_wg_partial_sum, layer_importance, normalize_importance, relative_change
from gora_dist.method.initialization import (
    gora_init_b,
    kaiming_uniform_a,
    module_seed,
    projected_energy,
    gradient_times_a,
    gram_cholesky,
    rslora_scaling,
)


# --- importance -------------------------------------------------------------------------------

def test_mean_abs_wg_by_hand():
    weight = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    grad = torch.tensor([[3.0, 1.0], [-2.0, 0.25]])
    # |W⊙G| = [[3, 2], [1, 1]] -> mean 7/4
    assert layer_importance("mean_abs_wg", weight, grad) == pytest.approx(1.75)


def test_partial_sums_of_row_shards_add_up_to_the_whole():
    weight, grad = torch.randn(7, 5), torch.randn(7, 5)
    parts = [abs_wg_partial_sum(weight[rows], grad[rows]) for rows in (slice(0, 3), slice(3, 7))]
    total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    assert total == pytest.approx(layer_importance("mean_abs_wg", weight, grad), rel=1e-6)


def test_nuclear_norm_metrics_match_singular_values():
    weight, grad = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    assert layer_importance("grad_nuclear", weight, grad) == pytest.approx(float(torch.linalg.svdvals(grad).sum()))
    wg = (weight.float() * grad.float()).double()
    assert layer_importance("wg_nuclear", weight, grad) == pytest.approx(float(torch.linalg.svdvals(wg).sum()), rel=1e-6)


def test_normalisation_and_its_errors():
    assert normalize_importance({"a": 3.0, "b": 1.0}) == {"a": 0.75, "b": 0.25}
    with pytest.raises(ValueError, match="every target layer has zero importance"):
        normalize_importance({"a": 0.0, "b": 0.0})
    with pytest.raises(ValueError, match="importance of b is nan"):
        normalize_importance({"a": 1.0, "b": float("nan")})


def test_relative_change_is_the_max_over_layers():
    assert relative_change({"a": 1.0, "b": 2.0}, {"a": 1.05, "b": 2.6}) == pytest.approx(0.3)


# --- allocation -------------------------------------------------------------------------------

def test_official_worked_example_identity_features():
    # gora-spec.md: f = [8192, 5120], I = [3, 1], r_ref = 8, clip [4, 32] -> [9, 5]; 106,496 vs 99,328
    shapes = {"big": (4096, 4096), "small": (1024, 4096)}
    advantage = normalize_importance({"big": 3.0, "small": 1.0})
    ranks = allocate_ranks(advantage, shapes, rank_ref=8, rank_min=4, rank_max=32, features="identity", rounding="floor")
    assert ranks == {"big": 9, "small": 5}
    assert rank_budget(shapes, 8, "identity") == 106_496 == lora_reference_count(shapes, 8)
    assert lora_param_count(shapes, ranks) == 99_328


def test_paper_sqrt_features_by_hand():
    shapes = {"q": (64, 64), "v": (40, 64), "o": (64, 64)}
    importance = {"q": 1.0, "v": 6.0, "o": 3.0}
    advantage = normalize_importance(importance)
    budget = (math.sqrt(128) + math.sqrt(104) + math.sqrt(128)) * 8
    expected = {n: min(max(math.floor(budget * advantage[n] / math.sqrt(sum(s)) + 0.5), 2), 32) for n, s in shapes.items()}
    ranks = allocate_ranks(advantage, shapes, rank_ref=8, rank_min=2, rank_max=32)
    assert ranks == expected
    assert ranks["v"] > ranks["o"] > ranks["q"]


def test_rounding_modes_and_clipping():
    assert [round_rank(4.5, "round"), round_rank(4.49, "round"), round_rank(4.9, "floor"), round_rank(4.1, "ceil")] == [5, 4, 4, 5]
    shapes = {"a": (100, 100), "b": (100, 100)}
    ranks = allocate_ranks({"a": 0.99, "b": 0.01}, shapes, rank_ref=8, rank_min=4, rank_max=12)
    assert ranks == {"a": 12, "b": 4}


def test_rank_never_exceeds_min_in_out():
    shapes = {"narrow": (3, 100), "wide": (100, 100)}
    ranks = allocate_ranks({"narrow": 0.9, "wide": 0.1}, shapes, rank_ref=8, rank_min=4, rank_max=32)
    assert ranks["narrow"] == 3


def test_rank_zero_is_allowed_with_rank_min_zero():
    shapes = {"a": (50, 50), "b": (50, 50)}
    assert allocate_ranks({"a": 1.0, "b": 0.0}, shapes, rank_ref=4, rank_min=0, rank_max=16)["b"] == 0



def test_fit_budget_recovers_what_the_clip_at_rank_max_gives_up():
    # two dominant layers: the paper's clip gives them 16 instead of ~29 and the total falls under budget
    shapes = {f"l{i}": (100, 100) for i in range(8)}
    advantage = normalize_importance({"l0": 30.0, "l1": 30.0, **{f"l{i}": 1.0 + 0.1 * i for i in range(2, 8)}})
    target = lora_reference_count(shapes, 8)  # 12,800
    clipped = allocate_ranks(advantage, shapes, rank_ref=8, rank_min=4, rank_max=16, features="identity")
    fitted = allocate_ranks(advantage, shapes, rank_ref=8, rank_min=4, rank_max=16, features="identity", fit_budget=True)
    assert lora_param_count(shapes, clipped) < 0.9 * target
    assert clipped["l0"] == fitted["l0"] == 16
    # every layer here costs 200 parameters per rank: the fit lands within half a rank of the target
    assert abs(lora_param_count(shapes, fitted) - target) <= 100
    assert all(4 <= r <= 16 for r in fitted.values())
    order = sorted(shapes, key=lambda n: advantage[n])
    assert [fitted[n] for n in order] == sorted(fitted.values())  # the importance order is kept


def test_fit_budget_stops_at_the_caps():
    shapes = {"a": (10, 10), "b": (10, 10)}
    ranks = fit_to_budget({"a": 1.0, "b": 3.0}, shapes, 10_000, rank_min=1, rank_max=6)
    assert ranks == {"a": 6, "b": 6}
    with pytest.raises(ValueError, match="every ideal rank is 0"):
        fit_to_budget({"a": 0.0, "b": 0.0}, shapes, 100, rank_min=1, rank_max=6)

# --- initialisation ---------------------------------------------------------------------------

def test_a0_depends_only_on_seed_and_name():
    first = kaiming_uniform_a(5, 33, seed=3, module_name="model.layers.0.q_proj")
    torch.manual_seed(1234)  # global RNG state must not matter
    torch.rand(10)
    again = kaiming_uniform_a(5, 33, seed=3, module_name="model.layers.0.q_proj")
    assert torch.equal(first, again)
    assert not torch.equal(first, kaiming_uniform_a(5, 33, seed=3, module_name="model.layers.0.k_proj"))
    assert not torch.equal(first, kaiming_uniform_a(5, 33, seed=4, module_name="model.layers.0.q_proj"))
    bound = 1 / math.sqrt(33)
    assert first.abs().max() <= bound and first.abs().max() > 0.8 * bound


def test_a0_is_identical_in_another_process():
    code = (
        "import torch; torch.manual_seed(99);"
        "from gora_dist.method.initialization import kaiming_uniform_a;"
        "print(repr(kaiming_uniform_a(3, 7, seed=11, module_name='blk.v_proj').flatten().tolist()))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = kaiming_uniform_a(3, 7, seed=11, module_name="blk.v_proj").flatten().tolist()
    assert eval(other) == here
    assert module_seed(11, "blk.v_proj") == module_seed(11, "blk.v_proj") < 2**63


def _reference_delta_w(grad, lora_a, gamma):
    """ΔW0 = -γ·√(in/r)·Ḡ·A0ᵀ(A0A0ᵀ)⁻¹A0 in float64 with an explicit inverse."""
    g, a = grad.double(), lora_a.double()
    rank, in_features = a.shape
    projector = a.T @ torch.linalg.inv(a @ a.T) @ a
    return -gamma * math.sqrt(in_features / rank) * g @ projector


@pytest.mark.parametrize("rank, out_features, in_features", [(1, 9, 17), (4, 24, 48), (13, 40, 31), (31, 64, 31)])
def test_b0_gives_the_closed_form_update(rank, out_features, in_features):
    torch.manual_seed(0)
    grad = torch.randn(out_features, in_features) * 1e-3
    lora_a = kaiming_uniform_a(rank, in_features, seed=0, module_name="layer")
    scaling = rslora_scaling(16.0, rank)
    lora_b, error = gora_init_b(grad, lora_a, gamma=0.05, scaling=scaling)
    assert lora_b.shape == (out_features, rank) and lora_b.dtype == torch.float32
    delta = scaling * lora_b.double() @ lora_a.double()
    reference = _reference_delta_w(grad, lora_a, 0.05)
    assert torch.linalg.norm(delta - reference) / torch.linalg.norm(reference) < 1e-5
    # the projection error is the relative residual of -γ√(in/r)Ḡ, whatever γ
    target = -0.05 * math.sqrt(in_features / rank) * grad.double()
    direct = float(torch.linalg.norm(delta - target) / torch.linalg.norm(target))
    # abs 1e-3: the error comes from ‖Ḡ‖² - ‖ḠP‖² with C = Ḡ·A0ᵀ in float32, so near 0 it is
    # only good to about √(float32 eps) ≈ 3e-4 (documented in docs/method.md)
    assert error == pytest.approx(direct, rel=1e-4, abs=1e-3)
    if rank == in_features:  # A0 spans everything: the step is reproduced (up to that precision)
        assert error < 1e-3


def test_update_does_not_depend_on_alpha():
    grad, lora_a = torch.randn(10, 20), kaiming_uniform_a(4, 20, seed=0, module_name="x")
    updates = []
    for alpha in (1.0, 16.0, 64.0):
        scaling = rslora_scaling(alpha, 4)
        lora_b, _ = gora_init_b(grad, lora_a, gamma=0.1, scaling=scaling)
        updates.append(scaling * lora_b @ lora_a)
    torch.testing.assert_close(updates[0], updates[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(updates[0], updates[2], rtol=1e-5, atol=1e-7)


def test_gamma_zero_gives_zero_b_and_still_reports_the_error():
    grad, lora_a = torch.randn(6, 8), kaiming_uniform_a(2, 8, seed=0, module_name="x")
    lora_b, error = gora_init_b(grad, lora_a, gamma=0.0, scaling=1.0)
    assert torch.count_nonzero(lora_b) == 0 and 0 < error < 1


def test_b0_rows_from_row_shards_equal_the_whole():
    grad, lora_a = torch.randn(11, 8), kaiming_uniform_a(3, 8, seed=0, module_name="x")
    whole, _ = gora_init_b(grad, lora_a, gamma=0.05, scaling=2.0)
    shards = [gora_init_b(grad[rows], lora_a, gamma=0.05, scaling=2.0)[0] for rows in (slice(0, 4), slice(4, 11))]
    torch.testing.assert_close(torch.cat(shards), whole)
    factor = gram_cholesky(lora_a)
    energy = sum(projected_energy(gradient_times_a(grad[rows], lora_a), factor) for rows in (slice(0, 5), slice(5, 11)))
    assert energy == pytest.approx(projected_energy(gradient_times_a(grad, lora_a), factor), rel=1e-9)


def test_rank_deficient_a0_is_a_clear_error():
    with pytest.raises(ValueError, match="not positive definite"):
        gram_cholesky(torch.ones(3, 5))
