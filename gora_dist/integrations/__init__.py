"""Plugging GoRA into existing training code: transformers' Trainer and accelerate."""

from gora_dist.integrations.hf_trainer import GoRAAdapterSaver, gather_adapters, prepare_gora, prepare_gora_peft

__all__ = ["prepare_gora", "prepare_gora_peft", "GoRAAdapterSaver", "gather_adapters"]
