"""The sharded randomized SVD (gora_dist/method/sharded_svd.py), every rank played in one process:
the products from flat shards (ZeRO-3's partitions cut rows in two) equal the dense ones, and the
singular triplets agree with torch.linalg.svd."""

import pytest
import torch

from gora_dist.method.shards import FlatShard
from gora_dist.method.sharded_svd import (
    canonical_signs,
    matrix_times,
    matrix_transpose_times,
    sharded_svd,
    svd_traffic_elements,
)


def no_reduce(tensor, what):
    return tensor


def pieces_of(matrix, world, layout):
    rows, cols = matrix.shape
    flat = matrix.reshape(-1)
    found = []
    for rank in range(world):
        if layout == "zero3":
            shard = FlatShard.even_partition(rank, world, rows, cols)
        else:  # fsdp2: row blocks of ceil(rows / world)
            chunk = -(-rows // world)
            first = min(rank * chunk, rows)
            shard = FlatShard.row_block(first, min(chunk, rows - first), rows, cols)
        found.append((flat[shard.start:shard.stop].clone(), shard))
    return found


def low_rank_plus_noise(rows, cols, rank, seed=0):
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(rows, rank, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(cols, rank, generator=generator, dtype=torch.float64)).Q
    values = torch.logspace(1, -1, rank, dtype=torch.float64)
    noise = 1e-3 * torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    return (left * values @ right.T + noise).float()


@pytest.mark.parametrize("layout, world", [("zero3", 3), ("zero3", 7), ("fsdp2", 4), ("one", 1)])
def test_products_from_shards_equal_the_dense_products(layout, world):
    matrix = torch.randn(13, 11)
    pieces = pieces_of(matrix, world, layout)
    right, left = torch.randn(11, 5), torch.randn(13, 5)
    torch.testing.assert_close(matrix_times(pieces, right, no_reduce, "M·X"), matrix @ right, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(matrix_transpose_times(pieces, left, no_reduce, "Mᵀ·Y"), matrix.T @ left,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout, world", [("zero3", 3), ("fsdp2", 2), ("one", 1)])
def test_leading_singular_triplets_match_the_dense_svd(layout, world):
    """A 64 × 48 matrix of rank 12 plus noise at 1e-3: the top 8 singular values to 1e-5 and their
    subspaces (|UᵀU_ref| singular values) to 1e-6 with p = 8, q = 2; any world size gives the same
    triplets, signs included, to float32 summation order; k = min(out, in) is the exact SVD."""
    matrix = low_rank_plus_noise(64, 48, 12)
    reference_u, reference_s, reference_vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    u, s, vh = sharded_svd(pieces_of(matrix, world, layout), 8, no_reduce, seed=3, name="layer")
    assert u.shape == (64, 8) and s.shape == (8,) and vh.shape == (8, 48)
    torch.testing.assert_close(s, reference_s[:8], rtol=1e-5, atol=0)
    for found, reference in ((u, reference_u[:, :8]), (vh.T, reference_vh[:8].T)):
        cosines = torch.linalg.svdvals(found.T @ reference)
        assert float(cosines.min()) > 1 - 1e-6
    one = sharded_svd(pieces_of(matrix, 1, "one"), 8, no_reduce, seed=3, name="layer")
    torch.testing.assert_close(u @ torch.diag(s) @ vh, one[0] @ torch.diag(one[1]) @ one[2], rtol=0, atol=1e-5)
    # the triplets themselves, signs included (LoRA-GA pairs different triplets): each u's largest entry > 0
    torch.testing.assert_close(u, one[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(vh, one[2], rtol=0, atol=1e-5)
    assert bool((u.gather(0, u.abs().argmax(0, keepdim=True)) > 0).all())
    flipped = canonical_signs(-u, s, -vh)
    assert torch.equal(flipped[0], u) and torch.equal(flipped[2], vh)

    exact_u, exact_s, exact_vh = sharded_svd(pieces_of(matrix, world, layout), 48, no_reduce, oversample=0,
                                             power_iters=0, name="layer")
    torch.testing.assert_close(exact_u @ torch.diag(exact_s) @ exact_vh, matrix.double(), rtol=0, atol=1e-5)


def test_a_rank_the_matrix_cannot_have_is_refused():
    with pytest.raises(ValueError, match=r"model.q_proj: rank 9 for a 8 x 16 matrix \(at most 8\)"):
        sharded_svd(pieces_of(torch.randn(8, 16), 1, "one"), 9, no_reduce, name="model.q_proj")


def test_traffic_is_adapter_sized():
    # a 4096 × 4096 layer at r = 16, p = 8, q = 2: 24 × (4096 + 2 × 8192 + 4096) floats, 3.5 % of the weight
    assert svd_traffic_elements(4096, 4096, 16, 8, 2) == 24 * (4096 + 2 * 8192 + 4096)
    assert svd_traffic_elements(4096, 4096, 16, 8, 2) < 0.04 * 4096 * 4096
