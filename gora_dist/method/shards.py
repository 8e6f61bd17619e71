"""What one rank owns of a weight, and GoRA's per-shard math (pure functions, no collectives).

Every engine's ownership is described the same way: a contiguous range [start, stop) of the
weight's row-major flattening (out × in). FSDP2's Shard(0) gives whole rows; DeepSpeed ZeRO-3 gives
flat partitions that may cut a row in two; a single process or DDP owns everything. The sums
computed here add up across ranks to the full-matrix quantities exactly:

- Σ|W⊙Ḡ|, the element count and ‖Ḡ‖² (importance and projection error),
- C = Ḡ·A0ᵀ (out × r): each rank adds the rows it holds, and a row split between two ranks gets
  its two partial products (Ḡ[row, cols]·A0[:, cols]ᵀ), so the sum over ranks is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch


@dataclass(frozen=True)
class FlatShard:
    """Elements [start, stop) of a row-major (rows × cols) weight; start == stop for an empty shard."""

    start: int
    stop: int
    rows: int
    cols: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.stop <= self.rows * self.cols:
            raise ValueError(f"shard [{self.start}, {self.stop}) does not fit a {self.rows}x{self.cols} weight")

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @classmethod
    def whole(cls, rows: int, cols: int) -> "FlatShard":
        return cls(0, rows * cols, rows, cols)

    @classmethod
    def row_block(cls, first_row: int, row_count: int, rows: int, cols: int) -> "FlatShard":
        return cls(first_row * cols, (first_row + row_count) * cols, rows, cols)

    @classmethod
    def even_rows(cls, rank: int, world_size: int, rows: int, cols: int) -> "FlatShard":
        """FSDP2's Shard(0) split: blocks of ceil(rows / world) whole rows, the last ones shorter or empty."""
        chunk = -(-rows // world_size)
        first = min(rank * chunk, rows)
        return cls.row_block(first, min(chunk, rows - first), rows, cols)

    @classmethod
    def even_partition(cls, rank: int, world_size: int, rows: int, cols: int) -> "FlatShard":
        """DeepSpeed ZeRO-3's split: chunks of ceil(numel / world) elements, the last ones shorter or empty."""
        numel = rows * cols
        chunk = -(-numel // world_size)
        return cls(min(rank * chunk, numel), min((rank + 1) * chunk, numel), rows, cols)


def shard_times_a(grad_flat: torch.Tensor, shard: FlatShard, lora_a: torch.Tensor) -> Tuple[int, torch.Tensor]:
    """This shard's contribution to C = Ḡ·A0ᵀ, in float32.

    grad_flat: (shard.numel,) the owned elements of Ḡ; lora_a: (r, cols).
    Returns (first_row, block): block (k, r) must be added to C[first_row : first_row + k].
    """
    rank = lora_a.shape[0]
    lora_a = lora_a.to(device=grad_flat.device, dtype=torch.float32)
    grad_flat = grad_flat.to(torch.float32)
    if grad_flat.numel() != shard.numel:
        raise ValueError(f"gradient shard has {grad_flat.numel()} elements, the shard spans {shard.numel}")
    if shard.numel == 0:
        return 0, grad_flat.new_zeros(0, rank)
    cols = shard.cols
    first_row, first_col = divmod(shard.start, cols)
    last_row, end_col = divmod(shard.stop, cols)  # stop is exclusive: the last element is (last_row, end_col - 1)
    if first_row == last_row:  # inside one row
        return first_row, (grad_flat @ lora_a[:, first_col:end_col].T).unsqueeze(0)
    pieces, offset = [], 0
    if first_col:  # head: the end of a row that starts on another rank
        head = cols - first_col
        pieces.append((grad_flat[:head] @ lora_a[:, first_col:].T).unsqueeze(0))
        offset = head
    full_rows = (shard.numel - offset - end_col) // cols
    if full_rows:
        pieces.append(grad_flat[offset : offset + full_rows * cols].view(full_rows, cols) @ lora_a.T)
    if end_col:  # tail: the start of a row that ends on another rank
        pieces.append((grad_flat[shard.numel - end_col :] @ lora_a[:, :end_col].T).unsqueeze(0))
    return first_row, torch.cat(pieces)


def add_shard_product(projected: torch.Tensor, grad_flat: torch.Tensor, shard: FlatShard, lora_a: torch.Tensor) -> None:
    """projected (rows, r) float32 += this shard's part of Ḡ·A0ᵀ (zeros elsewhere)."""
    first_row, block = shard_times_a(grad_flat, shard, lora_a)
    projected[first_row : first_row + block.shape[0]] += block.to(projected.device)
