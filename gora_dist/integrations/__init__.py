"""Plugging GoRA into existing training code: transformers' Trainer and accelerate."""

from .hf_trainer import GoRAAdapterSaver, gather_adapters, prepare_gora

__all__ = ["prepare_gora", "GoRAAdapterSaver", "gather_adapters"]
