"""GeLoRA ranks: the block bound, mapping to layers, the budget option, and the allocator end to end."""

import pytest

from conftest import lm_batches, tiny_llama
from gora_dist import GoRAConfig, apply_gora
from gora_dist.method.allocation import lora_param_count, lora_reference_count
from gora_dist.method.gelora import block_ranks, gelora_rank_map


def test_block_bound_is_the_rising_part_of_the_dimension():
    # d: embeddings 10.2, then blocks 14.1 (+3.9), 13.0 (-1.1), 20.5 (+7.5)
    assert block_ranks([10.2, 14.1, 13.0, 20.5]) == [4, 0, 8]
    assert block_ranks([10.2, 14.1, 13.0, 20.5], offset=2) == [6, 2, 10]


def test_layers_take_their_blocks_rank_clipped_and_capped():
    shapes = {"m.layers.0.q": (64, 64), "m.layers.0.v": (16, 64), "m.layers.1.q": (64, 64), "m.head": (64, 64)}
    ranks, notes = gelora_rank_map([40, 0], ["m.layers.0", "m.layers.1"], shapes, rank_ref=8, rank_min=2, rank_max=32)
    assert ranks == {"m.layers.0.q": 32, "m.layers.0.v": 16, "m.layers.1.q": 2, "m.head": 8}
    assert notes == ["m.head: in no transformer block, given rank_ref=8"]


def test_scaling_to_the_budget():
    shapes = {f"b.{i}.w": (100, 100) for i in range(4)}
    ranks, notes = gelora_rank_map([1, 2, 3, 6], [f"b.{i}" for i in range(4)], shapes, rank_ref=6, rank_min=1,
                                   rank_max=64, scale_to_budget=True)
    assert ranks == {"b.0.w": 2, "b.1.w": 4, "b.2.w": 6, "b.3.w": 12}  # × 2 = 24 / 12
    assert lora_param_count(shapes, ranks) == lora_reference_count(shapes, 6)
    assert "4,800 of 4,800 parameters" in notes[0]


def test_allocator_on_a_tiny_model_is_bounded_and_deterministic():
    config = GoRAConfig(allocator="gelora", grad_steps=6, rank_min=2, rank_max=12, gelora_offset=1, seed=3)
    first = apply_gora(tiny_llama(), lm_batches(6, batch_size=8), config)
    second = apply_gora(tiny_llama(), lm_batches(6, batch_size=8), config)
    assert first.rank_map == second.rank_map and first.intrinsic_dimensions == second.intrinsic_dimensions
    assert len(first.intrinsic_dimensions) == 3  # embeddings + 2 blocks
    expected = block_ranks(first.intrinsic_dimensions, offset=1)
    for name, rank in first.rank_map.items():
        block = int(name.split(".")[2])
        assert rank == min(max(expected[block], 2), 12, *first.layers[name].shape)
    assert any("GeLoRA: TwoNN (mle) on 48 mean-pooled sequences" in note for note in first.notes)


def test_gelora_config_is_checked():
    with pytest.raises(ValueError, match="allocator='adalora' is not one of"):
        GoRAConfig(allocator="adalora")
