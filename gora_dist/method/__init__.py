"""The method's formulas as pure functions of tensors: importance, rank allocation, the pseudo-inverse
init, shard sums, GeLoRA's ranks, the communication model. Nothing here sees torch.distributed."""
