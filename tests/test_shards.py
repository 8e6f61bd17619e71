"""Per-shard math: any split of a weight's flat range — whole rows (FSDP2), flat partitions that cut
rows (ZeRO-3), tiny shards inside one row, empty shards — adds up to the full-matrix quantities."""

import pytest
import torch

from gora_dist.method.importance import abs_wg_partial_sum
from gora_dist.method.shards import FlatShard, add_shard_product, shard_times_a


def split_points(rows, cols, world):
    return [FlatShard.even_partition(rank, world, rows, cols) for rank in range(world)]


@pytest.mark.parametrize("rows, cols, world", [(7, 5, 2), (7, 5, 3), (75, 48, 4), (3, 11, 8), (1, 9, 4), (6, 4, 2)])
def test_partial_products_sum_to_g_times_a_transposed(rows, cols, world):
    torch.manual_seed(0)
    grad, lora_a = torch.randn(rows, cols), torch.randn(3, cols)
    shards = split_points(rows, cols, world)
    assert sum(s.numel for s in shards) == rows * cols and shards[0].start == 0 and shards[-1].stop == rows * cols
    projected = torch.zeros(rows, 3)
    for shard in shards:
        add_shard_product(projected, grad.reshape(-1)[shard.start:shard.stop], shard, lora_a)
    torch.testing.assert_close(projected, grad @ lora_a.T, rtol=1e-5, atol=1e-5)


def test_a_split_row_gets_both_halves():
    grad, lora_a = torch.arange(12.0).view(3, 4), torch.ones(1, 4)
    head = FlatShard(0, 6, 3, 4)   # row 0 and the first half of row 1
    tail = FlatShard(6, 12, 3, 4)  # second half of row 1 and row 2
    first, block = shard_times_a(grad.reshape(-1)[:6], head, lora_a)
    assert first == 0 and block.squeeze(1).tolist() == [0 + 1 + 2 + 3, 4 + 5]
    first, block = shard_times_a(grad.reshape(-1)[6:], tail, lora_a)
    assert first == 1 and block.squeeze(1).tolist() == [6 + 7, 8 + 9 + 10 + 11]


def test_shard_inside_one_row_and_empty_shard():
    grad, lora_a = torch.randn(2, 10), torch.randn(2, 10)
    first, block = shard_times_a(grad.reshape(-1)[12:15], FlatShard(12, 15, 2, 10), lora_a)
    assert first == 1
    torch.testing.assert_close(block[0], grad[1, 2:5] @ lora_a[:, 2:5].T)
    first, block = shard_times_a(grad.reshape(-1)[:0], FlatShard(20, 20, 2, 10), lora_a)
    assert block.shape == (0, 2)


def test_even_partition_is_deepspeeds_split():
    # ceil(numel / world) elements per rank; later ranks may be short or empty
    assert [(s.start, s.stop) for s in split_points(3, 1, 4)] == [(0, 1), (1, 2), (2, 3), (3, 3)]
    assert [(s.start, s.stop) for s in split_points(5, 3, 2)] == [(0, 8), (8, 15)]


def test_importance_partials_over_flat_shards():
    weight, grad = torch.randn(9, 7), torch.randn(9, 7)
    parts = [abs_wg_partial_sum(weight.reshape(-1)[s.start:s.stop], grad.reshape(-1)[s.start:s.stop])
             for s in split_points(9, 7, 4)]
    assert sum(p[0] for p in parts) / sum(p[1] for p in parts) == pytest.approx(float((weight * grad).abs().mean()), rel=1e-6)


def test_bad_shard_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        FlatShard(0, 100, 3, 4)
