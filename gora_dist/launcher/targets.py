"""Which layers GoRA adapts, per model family: the names transformers models give their linear layers.

``auto`` looks the model's ``config.model_type`` up in :data:`FAMILY_TARGETS`; ``all-linear`` takes
every ``nn.Linear`` except the output head (the LM head, a classifier) — PEFT's rule of the same
name; a list is used as it is. A family we do not know is an error that lists the linear layers the
model has, so the user can pick. Mixture-of-experts families get their attention projections only:
transformers 5 stores their experts as fused 3-D parameters, not ``nn.Linear`` layers.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Union

import torch.nn as nn

from gora_dist.model.targets import module_matches

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
FUSED_QKV_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
BERT_TARGETS = ["query", "key", "value", "dense"]

FAMILY_TARGETS: Dict[str, List[str]] = {
    **{family: LLAMA_TARGETS for family in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite",
        "stablelm", "cohere", "smollm3")},
    "mixtral": ATTENTION_TARGETS,
    "qwen3_moe": ATTENTION_TARGETS,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt_neox": FUSED_QKV_TARGETS,
    "falcon": FUSED_QKV_TARGETS,
    "bloom": FUSED_QKV_TARGETS,
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "starcoder2": ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"],
    "bert": BERT_TARGETS,
}
NOT_LINEAR = {"gpt2": "GPT-2's projections are transformers Conv1D layers, not nn.Linear"}


def _head_modules(model: nn.Module, heads: Sequence[str]) -> set:
    found = set()
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        found.add(id(model.get_output_embeddings()))
    for name, module in model.named_modules():
        if name and module_matches(name, list(heads)):
            found.update(id(sub) for sub in module.modules())
    return found


def linear_layer_names(model: nn.Module, heads: Sequence[str] = ()) -> List[str]:
    """The distinct last names of the model's nn.Linear layers, heads left out, in module order."""
    skip = _head_modules(model, heads)
    names: List[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module) not in skip and name.rsplit(".", 1)[-1] not in names:
            names.append(name.rsplit(".", 1)[-1])
    return names


def resolve_targets(wanted: Union[str, Sequence[str]], model: nn.Module, heads: Sequence[str] = ()) -> Union[str, List[str]]:
    """``auto`` / ``all-linear`` / a list (or a regex string) -> what GoRAConfig.target_modules gets."""
    if wanted == "all-linear":
        names = linear_layer_names(model, heads)
        if not names:
            raise ValueError(f"target_modules=all-linear: the model ({type(model).__name__}) has no nn.Linear layer "
                             "besides its head")
        return names
    if wanted != "auto":
        return wanted if isinstance(wanted, str) else list(wanted)
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family in FAMILY_TARGETS:
        return list(FAMILY_TARGETS[family])
    reason = NOT_LINEAR.get(family, f"no target modules are known for the model family {family!r}")
    names = linear_layer_names(model, heads)
    raise ValueError(f"target_modules=auto: {reason}; its nn.Linear layers (head left out) are named {names}: "
                     f"pass --gora.target_modules with some of them (e.g. '{','.join(names[:4])}') or "
                     "--gora.target_modules all-linear")
