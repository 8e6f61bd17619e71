"""The collectives GoRA issues and the ways to hold a full tensor however an engine shards it: the only
torch.distributed (and, for gathering ZeRO-3 parameters, DeepSpeed) calls outside the engines."""
