"""Building one model the launcher can fine-tune (whole, from its config alone, or on the meta device),
and activation checkpointing; where it comes from: launcher/model_sources.py."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from gora_dist.launcher.model_sources import TINY_MODELS, model_source
from gora_dist.launcher.quantization import load_quantized
from gora_dist.launcher.tokenizer import ByteTokenizer


def _tiny_model(spec: str, head: dict, max_length: int) -> nn.Module:
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
    return model


def _dtype_and_head(precision: str, labels: Sequence[str]):
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    head = {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {l: i for i, l in enumerate(labels)}}
    return dtype, head


def _check_tiny(spec: str, task: str) -> None:
    if (spec == "tiny-bert") != (task == "seq-cls"):
        raise ValueError(f"model={spec!r} with task={task!r}: tiny-bert is a sequence classifier (seq-cls), "
                         "tiny-llama a causal LM (causal-lm, sft)")


def _build(spec: str, task: str, labels: Sequence[str], precision: str, max_length: int, weights: bool,
           quantization=None, device=None) -> nn.Module:
    """The model with its checkpoint's weights (``weights``) or, from its config alone, without them;
    quantization: a ``BitsAndBytesConfig``, the model then loaded quantised onto ``device``."""
    dtype, head = _dtype_and_head(precision, labels)
    if spec in TINY_MODELS:
        if quantization is not None:
            raise ValueError(f"model={spec!r} is built from a config, not loaded: it cannot be quantised on load")
        _check_tiny(spec, task)
        return _tiny_model(spec, head, max_length).to(dtype)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    folder, extra = model_source(spec)
    auto, head = (AutoModelForSequenceClassification, head) if task == "seq-cls" else (AutoModelForCausalLM, {})
    if not weights:
        return auto.from_config(AutoConfig.from_pretrained(folder, **head, **extra), dtype=dtype)
    if quantization is not None:
        return load_quantized(auto, folder, extra, dtype=dtype, quantization=quantization, device=device, **head)
    model = auto.from_pretrained(folder, dtype=dtype, **head, **extra)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None  # GGUF weights are dequantised on load; nothing stays quantised
    return model


def load_model(spec: str, *, task: str = "causal-lm", labels: Sequence[str] = ("negative", "positive"),
               precision: str = "fp32", max_length: int = 64, quantization=None, device=None) -> nn.Module:
    """The model in eval mode: a causal LM (tasks causal-lm, sft) or a sequence classifier with a new
    head of ``labels`` (seq-cls). Seed the global RNG first: a new head is random. quantization: a
    ``BitsAndBytesConfig`` (launcher/quantization.py); the model is then on ``device`` already."""
    model = _build(spec, task, labels, precision, max_length, weights=True, quantization=quantization, device=device)
    model.config._name_or_path = spec
    return model.eval()


def model_from_config(spec: str, *, task: str = "causal-lm", labels: Sequence[str] = ("negative", "positive"),
                      precision: str = "fp32", max_length: int = 64) -> nn.Module:
    """The architecture ``load_model`` would return, built from its config without reading weights
    (inside ``zero.Init`` or ``init_empty_weights``, whichever context the caller is in)."""
    return _build(spec, task, labels, precision, max_length, weights=False)


def model_skeleton(spec: str, *, task: str = "causal-lm", labels: Sequence[str] = ("negative", "positive"),
                   precision: str = "fp32", max_length: int = 64) -> nn.Module:
    """The architecture ``load_model`` would return, its parameters on the meta device (no memory)
    and its buffers real (rotary frequencies and the like are computed, not loaded)."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        raise ValueError("loading a model sharded (engine fsdp2) builds it on the meta device with accelerate: "
                         "pip install accelerate") from None

    with init_empty_weights(include_buffers=False):
        model = model_from_config(spec, task=task, labels=labels, precision=precision, max_length=max_length)
    return model.eval()


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' activation checkpointing, non-reentrant (it works with frozen inputs and with
    parameters that FSDP2 or ZeRO-3 gather inside the recomputed forward)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it in transformers")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@contextlib.contextmanager
def checkpointing_in_eval_mode(model: nn.Module) -> Iterator[None]:
    """transformers recomputes a block only in training mode, but GoRA's gradient steps run in eval
    mode (no dropout): mark just the checkpointed blocks as training, their submodules stay in eval."""
    blocks = [module for module in model.modules() if getattr(module, "gradient_checkpointing", False)]
    saved = [block.training for block in blocks]
    for block in blocks:
        block.training = True
    try:
        yield
    finally:
        for block, training in zip(blocks, saved):
            block.training = training
