"""Plugging GoRA into existing training code: transformers' Trainer, TRL and accelerate."""

from gora_dist.integrations.adapter_saver import GoRAAdapterSaver, gather_adapters
from gora_dist.integrations.hf_trainer import prepare_gora, prepare_gora_peft
from gora_dist.integrations.prepare_trainer import prepare_trainer

__all__ = ["prepare_trainer", "prepare_gora", "prepare_gora_peft", "GoRAAdapterSaver", "gather_adapters"]
