"""gora_dist: GoRA (gradient-driven adaptive LoRA, arXiv 2502.12171) for single and sharded training.

    from gora_dist import GoRAConfig, apply_gora, save_adapter
    report = apply_gora(model, batches, GoRAConfig(target_modules=["q_proj", "v_proj"]))
    save_adapter(model, "out/", report)

Sharded (DeepSpeed ZeRO-3, FSDP2, DDP): ``estimate_plan`` then ``apply_plan``. The package's layers,
each importing only those above it in this list (docs/design.md):

- ``config``, ``report``: what you ask for, and what GoRA decided (the records every layer shares);
- ``method/``: the formulas, pure functions of tensors (no torch.distributed);
- ``comm/``: the collectives and gathering of sharded tensors;
- ``model/``: what GoRA puts into and reads out of a model (GoRALinear, targets, adapter files, PEFT);
- ``engines/``: how each training engine exposes this rank's gradient shards, and which engine a run uses;
- ``pipeline/``: gradient steps → importances → ranks → A0/B0, and the plan into a model;
- ``integrations/``: the Trainer, TRL and accelerate; ``launcher/``: ``launch/train.py``'s run.
"""


def _checkout_kernels() -> None:
    """Make ``gora_dist.kernels`` importable from a plain checkout (no pip install).

    setup.py installs the repository's top-level ``kernels/`` as ``gora_dist.kernels`` (``package_dir``).
    In a checkout on ``sys.path`` without that install, ``gora_dist/kernels`` does not exist, so that one
    package is loaded here from ``<checkout>/kernels`` and registered under its installed name; its
    submodules then resolve through its ``__path__``. Nothing else changes: no other top-level folder
    becomes ``gora_dist.X``, no import hook stays behind. An installed copy (``site-packages/gora_dist/
    kernels``) is left to the normal import; a checkout (``setup.py`` beside ``kernels/``) always uses
    its own ``kernels/``, also when an editable install of another checkout is on the path.
    """
    import importlib.util
    import os
    import sys

    name = __name__ + ".kernels"
    package_dir = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(package_dir)
    init = os.path.join(root, "kernels", "__init__.py")
    if name in sys.modules or os.path.isdir(os.path.join(package_dir, "kernels")) \
            or not (os.path.isfile(init) and os.path.isfile(os.path.join(root, "setup.py"))):
        return
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    globals()["kernels"] = module  # as the import system sets a submodule on its parent


_checkout_kernels()

from gora_dist.comm.collectives import GoRADistributedError
from gora_dist.config import GoRAConfig
from gora_dist.method.allocation import allocate_ranks, lora_param_count, lora_reference_count, rank_budget
from gora_dist.method.importance import layer_importance, normalize_importance
from gora_dist.method.initialization import gora_init_b, kaiming_uniform_a
from gora_dist.model.adapter_io import load_adapter, load_plan, save_adapter, save_plan, save_uniform_adapter
from gora_dist.model.layers import GoRALinear, gora_modules, mark_only_adapters_trainable, merge_adapters
from gora_dist.model.peft_model import lora_config, to_peft
from gora_dist.model.targets import find_target_modules
from gora_dist.pipeline.apply import apply_gora, apply_plan, copy_plan_into_adapters
from gora_dist.pipeline.estimation import estimate_gradients
from gora_dist.pipeline.plan import build_plan
from gora_dist.pipeline.sharded import estimate_plan
from gora_dist.report import GoRAPlan, GoRAReport, LayerReport

__version__ = "0.1.0"

__all__ = [
    "GoRAConfig", "GoRALinear", "GoRAReport", "LayerReport", "GoRAPlan", "GoRADistributedError",
    "apply_gora", "estimate_plan", "build_plan", "apply_plan", "copy_plan_into_adapters", "estimate_gradients", "find_target_modules",
    "save_adapter", "save_uniform_adapter", "save_plan", "load_plan", "load_adapter", "merge_adapters",
    "to_peft", "lora_config",
    "gora_modules", "mark_only_adapters_trainable",
    "allocate_ranks", "lora_param_count", "lora_reference_count", "rank_budget",
    "layer_importance", "normalize_importance", "gora_init_b", "kaiming_uniform_a",
]
