"""TwoNN on synthetic data of known dimension: flat subspaces and curved manifolds embedded in R^D.
Coordinates are Gaussian (no boundary: points near a cube's faces bias TwoNN low, 8.6 for d = 10)."""

import math

import pytest
import torch

from gora_dist.method.intrinsic_dimension import twonn, twonn_dimension

AMBIENT = 40


def random_rotation(size, generator):
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q


def linear_subspace(d, n, seed):
    generator = torch.Generator().manual_seed(seed)
    coords = torch.randn(n, d, generator=generator, dtype=torch.float64)
    embedded = torch.cat([coords, torch.zeros(n, AMBIENT - d, dtype=torch.float64)], dim=1)
    return embedded @ random_rotation(AMBIENT, generator)


def curved_graph(d, n, seed):
    """The graph of a smooth map R^d -> R^(AMBIENT-d), t -> 0.5·sin(t·W/√d), rotated: curved, dimension d."""
    generator = torch.Generator().manual_seed(seed)
    coords = torch.randn(n, d, generator=generator, dtype=torch.float64)
    weights = torch.randn(d, AMBIENT - d, generator=generator, dtype=torch.float64) / math.sqrt(d)
    bend = 0.5 * torch.sin(coords @ weights)
    return torch.cat([coords, bend], dim=1) @ random_rotation(AMBIENT, generator)


@pytest.mark.parametrize("method", ["mle", "fit"])
@pytest.mark.parametrize("d", [2, 5, 10])
@pytest.mark.parametrize("manifold", [linear_subspace, curved_graph])
def test_known_dimensions_within_ten_percent(manifold, d, method):
    estimate = twonn_dimension(manifold(d, 4000, seed=d), method=method)
    assert abs(estimate - d) <= 0.1 * d, (manifold.__name__, d, method, estimate)


def test_duplicates_are_dropped_and_counted_not_infinite():
    points = linear_subspace(3, 500, seed=0)
    with_copies = torch.cat([points, points[:20]])  # 20 points now have a twin at distance 0
    result = twonn(with_copies)
    assert result.dropped_duplicates == 40 and result.used == 480
    assert math.isfinite(result.dimension) and abs(result.dimension - 3) < 0.5


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="N >= 3 points"):
        twonn(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="NaN or Inf"):
        twonn(torch.tensor([[0.0, 1.0], [1.0, float("nan")], [2.0, 2.0]]))
    with pytest.raises(ValueError, match="only 0 distinct points"):
        twonn(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="method='pca'"):
        twonn(torch.randn(10, 3), method="pca")
