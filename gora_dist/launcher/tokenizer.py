"""The tokenizer the launcher's tasks see: one small interface over a Hugging Face tokenizer and the
byte tokenizer of the random test models, loaded from local files before any process group exists
(so bad data or a missing chat template is reported before ranks start talking)."""

from __future__ import annotations

from typing import List, Sequence, Tuple

from gora_dist.launcher.model_sources import TINY_MODELS, model_source


def character_tokenizer(chat_template: str):
    """A character-level fast tokenizer (printable ASCII and newline; ``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2) with ``chat_template``: for random-weight models saved as folders by the tests and
    benchmarks, so they load like any Hugging Face model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = [chr(code) for code in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{char: index + 3 for index, char in enumerate(characters)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


class ByteTokenizer:
    """For the random tiny models: bytes are ids 0..255, 256 is padding and end of text, 257/258 the
    sentiment label words. No chat template."""

    pad_id = eos_id = 256
    label_ids = (257, 258)
    vocab_size = 259
    prefix: List[int] = []
    chat_template = None
    name = "the byte tokenizer of the tiny test models"

    @staticmethod
    def encode(text: str) -> List[int]:
        return list(text.encode("utf-8"))

    encode_with_special = encode  # no special tokens to add

    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        ids, offsets = [], []
        for position, char in enumerate(text):
            for byte in char.encode("utf-8"):
                ids.append(byte)
                offsets.append((position, position + 1))
        return ids, offsets

    @staticmethod
    def decode(ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def render_chat(self, messages, add_generation_prompt: bool) -> str:
        raise AssertionError("the byte tokenizer has no chat template")


class HFTokenizer:
    """A transformers tokenizer: encode without special tokens, the model's own start tokens in
    ``prefix`` (BOS where the tokenizer adds one), end of text, padding, the chat template."""

    def __init__(self, tokenizer, name: str) -> None:
        self.tokenizer, self.name = tokenizer, name
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.prefix = [i for i in tokenizer("", add_special_tokens=True).input_ids if i != self.eos_id]
        self.chat_template = getattr(tokenizer, "chat_template", None)

    def encode(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def encode_with_special(self, text: str) -> List[int]:
        """With the model's own special tokens ([CLS] ... [SEP] for BERT): for sequence classifiers."""
        return self.tokenizer(text).input_ids

    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"{self.name}: chat data needs a fast tokenizer (character offsets) to find the assistant turns")
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return encoded.input_ids, [tuple(span) for span in encoded.offset_mapping]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def load_tokenizer(spec: str):
    """The tokenizer of a model spec (packaged name, tiny test model, or local folder)."""
    if spec in TINY_MODELS:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    folder, extra = model_source(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    except (OSError, ValueError) as problem:
        raise ValueError(f"model={spec!r}: no tokenizer could be loaded from {folder}: {problem}") from None
    return HFTokenizer(tokenizer, f"the tokenizer of {spec}")


def single_token(tokenizer, word: str) -> int:
    ids = tokenizer.encode(word)
    if len(ids) != 1:
        raise ValueError(f"label word {word!r} is {len(ids)} tokens for {tokenizer.name}; it must be one")
    return ids[0]
