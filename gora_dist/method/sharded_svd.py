"""Leading singular vectors of a matrix that no rank holds whole (pure functions; the sum across
ranks is passed in).

Each rank owns a :class:`FlatShard` of M (out × in): rows under FSDP2, a flat slice under ZeRO-3,
everything on one process. The randomized SVD (Halko, Martinsson & Tropp 2011, Algorithm 4.4: a
range finder with power iterations, each re-orthonormalised) needs M only through the products
M·X and Mᵀ·Y, and both are sums of the ranks' contributions:

    (M·X)[i]  = Σ_j M[i, j]·X[j]      a rank adds the rows i it holds elements of,
    (Mᵀ·Y)[j] = Σ_i M[i, j]·Y[i]      a rank adds, for each element it holds, M[i, j]·Y[i] to row j.

So the only traffic is out × k (for M·Ω) or in × k (for Mᵀ·Q) floats per product, k = r + p (the
adapter's size, not the weight's), and every rank then runs the same small QR and SVD on identical
sums. ``k = min(out, in)`` with no oversampling is the exact SVD (the range found is M's whole range).
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch

from gora_dist.method.initialization import module_seed
from gora_dist.method.shards import FlatShard, add_shard_product

Reduce = Callable[[torch.Tensor, str], torch.Tensor]
"""Sums a tensor over the ranks (in place or not) and returns the sum; the string says what it is."""

Pieces = Sequence[Tuple[torch.Tensor, FlatShard]]
"""The (flat elements, shard) pairs this process adds up: one per rank in a real run, every shard
in a test that plays all ranks in one process."""


def add_shard_transpose_product(result: torch.Tensor, flat: torch.Tensor, shard: FlatShard, right: torch.Tensor) -> None:
    """result (cols, k) += (this shard of M)ᵀ · right, right (rows, k); rows split by a ZeRO-3
    partition contribute their owned columns only."""
    if shard.numel == 0:
        return
    flat = flat.to(result.dtype)
    right = right.to(device=flat.device, dtype=result.dtype)
    cols = shard.cols
    first_row, first_col = divmod(shard.start, cols)
    last_row, end_col = divmod(shard.stop, cols)
    if first_row == last_row:  # inside one row
        result[first_col:end_col] += torch.outer(flat, right[first_row])
        return
    offset = 0
    if first_col:  # the end of a row that starts on another rank
        offset = cols - first_col
        result[first_col:] += torch.outer(flat[:offset], right[first_row])
    full_rows = (shard.numel - offset - end_col) // cols
    row = first_row + (1 if first_col else 0)
    if full_rows:
        result += flat[offset:offset + full_rows * cols].view(full_rows, cols).T @ right[row:row + full_rows]
    if end_col:  # the start of a row that ends on another rank
        result[:end_col] += torch.outer(flat[shard.numel - end_col:], right[last_row])


def matrix_times(pieces: Pieces, right: torch.Tensor, reduce: Reduce, what: str) -> torch.Tensor:
    """M · right (rows × k) from the pieces, summed over ranks."""
    shard = pieces[0][1]
    total = torch.zeros(shard.rows, right.shape[1], dtype=torch.float32, device=pieces[0][0].device)
    for flat, piece in pieces:
        add_shard_product(total, flat, piece, right.T)
    return reduce(total, what)


def matrix_transpose_times(pieces: Pieces, right: torch.Tensor, reduce: Reduce, what: str) -> torch.Tensor:
    """Mᵀ · right (cols × k) from the pieces, summed over ranks."""
    shard = pieces[0][1]
    total = torch.zeros(shard.cols, right.shape[1], dtype=torch.float32, device=pieces[0][0].device)
    for flat, piece in pieces:
        add_shard_transpose_product(total, flat, piece, right)
    return reduce(total, what)


def _orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns, in float64 (every rank computes it from identical sums)."""
    return torch.linalg.qr(matrix.to(torch.float64), mode="reduced").Q


def sharded_svd(pieces: Pieces, rank: int, reduce: Reduce, *, oversample: int = 8, power_iters: int = 2,
                seed: int = 0, name: str = "") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``rank`` singular triplets (U (out × rank), S (rank,), Vh (rank × in), float64)
    of the matrix the ranks' pieces make up. The test matrix Ω is drawn from (seed, name) on every
    rank alike. ``oversample`` p and ``power_iters`` q set the accuracy (Halko et al.: the error
    tends to the (rank + 1)-th singular value as q grows); k = min(rank + p, out, in) columns are
    carried, and k = min(out, in) is exact. Signs: :func:`canonical_signs`."""
    shard = pieces[0][1]
    rows, cols = shard.rows, shard.cols
    if not 1 <= rank <= min(rows, cols):
        raise ValueError(f"{name or 'matrix'}: rank {rank} for a {rows} x {cols} matrix (at most {min(rows, cols)})")
    width = min(rank + oversample, rows, cols)
    generator = torch.Generator(device="cpu").manual_seed(module_seed(seed, f"svd:{name}"))
    omega = torch.randn(cols, width, generator=generator, dtype=torch.float32).to(pieces[0][0].device)
    basis = _orthonormal(matrix_times(pieces, omega, reduce, f"{name} M·Ω"))
    for _ in range(power_iters):
        across = _orthonormal(matrix_transpose_times(pieces, basis.float(), reduce, f"{name} Mᵀ·Q"))
        basis = _orthonormal(matrix_times(pieces, across.float(), reduce, f"{name} M·Q'"))
    projected = matrix_transpose_times(pieces, basis.float(), reduce, f"{name} Qᵀ·M").to(torch.float64).T
    small_u, values, vh = torch.linalg.svd(projected, full_matrices=False)
    return canonical_signs((basis @ small_u)[:, :rank], values[:rank], vh[:rank])


def canonical_signs(u: torch.Tensor, values: torch.Tensor, vh: torch.Tensor):
    """Each triplet's sign fixed so that the largest-magnitude entry of its left vector is positive
    (scikit-learn's ``svd_flip`` rule); u_i and vh_i flip together, so U·S·Vh is unchanged. Without it
    a sign depends on rounding in the QR and the small SVD, i.e. on the order the ranks' sums were
    added: LoRA-GA's B0·A0 pairs different triplets, so its base offset would differ between world sizes."""
    rows = u.abs().argmax(dim=0)
    signs = torch.sign(u[rows, torch.arange(u.shape[1], device=u.device)])
    signs[signs == 0] = 1
    return u * signs, values, vh * signs[:, None]


def svd_traffic_elements(rows: int, cols: int, rank: int, oversample: int, power_iters: int) -> int:
    """float32 elements each rank sends into the sums of one :func:`sharded_svd`: M·Ω, then per power
    iteration Mᵀ·Q and M·Q', then Qᵀ·M."""
    width = min(rank + oversample, rows, cols)
    return width * (rows + power_iters * (cols + rows) + cols)
