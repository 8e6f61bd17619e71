"""GeLoRA's sample: forward hooks that record one mean-pooled hidden state per sequence and level
(level 0 the input embeddings, level i the output of block i), during GoRA's own estimation forwards."""

from __future__ import annotations

from typing import List, Mapping, Optional

import torch
import torch.nn as nn


class HiddenStateSampler:
    """Forward hooks that turn each forward into one mean-pooled point per sequence and level."""

    def __init__(self, embeddings: nn.Module, blocks: Mapping[str, nn.Module]) -> None:
        self.block_names = list(blocks)
        self.points: List[List[torch.Tensor]] = [[] for _ in range(len(blocks) + 1)]
        self.mask: Optional[torch.Tensor] = None
        self._handles = [embeddings.register_forward_hook(self._hook(0))]
        self._handles += [block.register_forward_hook(self._hook(i + 1)) for i, block in enumerate(blocks.values())]

    def _hook(self, level: int):
        def record(module, args, output):
            hidden = (output[0] if isinstance(output, (tuple, list)) else output).detach().float()
            if self.mask is None:
                pooled = hidden.mean(dim=1)
            else:
                weights = self.mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
            self.points[level].append(pooled.cpu())

        return record

    def stacked(self) -> torch.Tensor:
        """(levels, sequences, hidden) float32 of everything recorded on this rank."""
        return torch.stack([torch.cat(level) for level in self.points])

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


