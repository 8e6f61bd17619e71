"""gora_dist: GoRA (gradient-driven adaptive LoRA, arXiv 2502.12171) for single and sharded training.

    from gora_dist import GoRAConfig, apply_gora, save_adapter
    report = apply_gora(model, batches, GoRAConfig(target_modules=["q_proj", "v_proj"]))
    save_adapter(model, "out/", report)

Sharded (DeepSpeed ZeRO-3, FSDP2, DDP): ``gora_dist.distributed.estimate_plan`` then ``apply_plan``.
"""

from .adapter_io import load_adapter, save_adapter, save_plan, save_uniform_adapter
from .allocation import allocate_ranks, lora_param_count, lora_reference_count, rank_budget
from .apply import apply_gora
from .apply_utils import find_target_modules
from .collectives import GoRADistributedError
from .config import GoRAConfig
from .importance import layer_importance, normalize_importance
from .initialization import gora_init_b, kaiming_uniform_a
from .layers import GoRALinear, adapter_state_dict, gora_modules, mark_only_adapters_trainable, merge_adapters
from .plan import GoRAPlan, apply_plan, build_plan, copy_plan_into_adapters, estimate_gradients
from .report import GoRAReport, LayerReport

__version__ = "0.1.0"

__all__ = [
    "GoRAConfig", "GoRALinear", "GoRAReport", "LayerReport", "GoRAPlan", "GoRADistributedError",
    "apply_gora", "build_plan", "apply_plan", "copy_plan_into_adapters", "estimate_gradients", "find_target_modules",
    "save_adapter", "save_uniform_adapter", "save_plan", "load_adapter", "merge_adapters",
    "adapter_state_dict", "gora_modules", "mark_only_adapters_trainable",
    "allocate_ranks", "lora_param_count", "lora_reference_count", "rank_budget",
    "layer_importance", "normalize_importance", "gora_init_b", "kaiming_uniform_a",
]
