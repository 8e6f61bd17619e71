"""gora_dist: GoRA (gradient-driven adaptive LoRA, arXiv 2502.12171) for single and sharded training.

    from gora_dist import GoRAConfig, apply_gora, save_adapter
    report = apply_gora(model, batches, GoRAConfig(target_modules=["q_proj", "v_proj"]))
    save_adapter(model, "out/", report)
"""

from .adapter_io import load_adapter, save_adapter, save_uniform_adapter
from .allocation import allocate_ranks, lora_param_count, lora_reference_count, rank_budget
from .apply import apply_gora, estimate_gradients, find_target_modules
from .config import GoRAConfig
from .importance import layer_importance, normalize_importance
from .initialization import gora_init_b, kaiming_uniform_a
from .layers import GoRALinear, adapter_state_dict, gora_modules, mark_only_adapters_trainable, merge_adapters
from .report import GoRAReport, LayerReport

__version__ = "0.1.0"

__all__ = [
    "GoRAConfig", "GoRALinear", "GoRAReport", "LayerReport",
    "apply_gora", "estimate_gradients", "find_target_modules",
    "save_adapter", "save_uniform_adapter", "load_adapter", "merge_adapters",
    "adapter_state_dict", "gora_modules", "mark_only_adapters_trainable",
    "allocate_ranks", "lora_param_count", "lora_reference_count", "rank_budget",
    "layer_importance", "normalize_importance", "gora_init_b", "kaiming_uniform_a",
]
