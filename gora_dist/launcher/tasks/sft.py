"""Supervised fine-tuning of a causal LM on prompt → response data, evaluated by generation.

Loss: next-token cross-entropy on the response tokens (``train_on_prompt``: on every token), as
the mean over the response tokens of the whole global batch. Each micro-batch passes
``num_items_in_batch`` = (global batch's target tokens) / (ranks × micro-batches) to the model, so
its loss is its share of that mean and the averaged gradient is the same at every world size, for
GoRA's estimation and for training alike (a per-micro-batch mean would weigh a short response
like a long one, differently at each world size).

Evaluation on the held-out examples: the mean response negative log-likelihood (per token, over all
of them: low noise), and exact match of greedy generations (batched, KV cache, ``max_new_tokens``;
``answer_match``: the first number for answers that start with one, a normalised string otherwise;
see ``answers.py``). Under FSDP2 and ZeRO-3 every rank runs every forward of ``generate``
(``synced_gpus``) until the last rank's sequences are done.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from gora_dist.launcher.tasks.answers import answers_match
from gora_dist.launcher.tasks.base import all_sum, gather_samples, rank_chunks
from gora_dist.launcher.tasks.sft_data import SFTFields, sft_records, tokenize_records
from gora_dist.launcher.tasks.sft_loss import keeps_logits_at_positions, response_loss
from gora_dist.model.devices import to_device


PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
"""Attention implementations transformers masks per example from position_ids when no attention
mask is given."""


class SFTTask:
    metric_names = ("exact_match", "response_nll")

    def __init__(self, config, tokenizer) -> None:
        self.tokenizer, self.config = tokenizer, config
        fields = SFTFields(config.prompt_field, config.completion_field, config.messages_field)
        train_records, eval_records = sft_records(config.data, config.eval_data, config.eval_examples)
        train_records = train_records[:config.train_examples or None]  # 0: all of them
        self.train, self.train_lengths = tokenize_records(tokenizer, train_records, fields, config.max_length,
                                                          config.skip_long)
        self.evaluation, self.eval_lengths = tokenize_records(tokenizer, eval_records, fields, config.max_length,
                                                              config.skip_long)
        if not self.train or not self.evaluation:
            raise ValueError(f"data={config.data!r}: {len(self.train)} training and {len(self.evaluation)} held-out "
                             "examples left; both must be at least one")

    loss_fn = None
    """The training and gradient-estimation loss: :func:`sft_loss.response_loss` (logits only where a
    target is) once check_model found the model can do it, else the model's own."""

    padding_free = False
    """Whether micro-batches are padding-free rows: decided by :meth:`check_model` from the option
    and the model (the same on every rank)."""

    def check_model(self, model) -> str:
        """Choose the loss (logits at target positions when the model takes ``logits_to_keep`` and
        logits_at_targets is on) and the batch layout: padding-free needs a forward that takes
        position_ids and masks attention from them (every transformers model built on its masking
        utilities does). Asked for explicitly on a model that cannot, it is refused, naming the model;
        by default it is then off. Returns the line the run prints about both."""
        if self.config.logits_at_targets and keeps_logits_at_positions(model):
            self.loss_fn = response_loss
        import inspect

        inner = getattr(model, "module", model)
        implementation = getattr(getattr(inner, "config", None), "_attn_implementation", None)
        able = "position_ids" in inspect.signature(inner.forward).parameters and implementation in PACKED_ATTENTION
        if self.config.padding_free and not able:
            raise ValueError(f"padding_free: {type(inner).__name__} (attention {implementation!r}) cannot keep the "
                             f"examples of one row apart (it needs position_ids and one of {list(PACKED_ATTENTION)}); "
                             "run with --padding-free false")
        self.padding_free = able if self.config.padding_free is None else self.config.padding_free
        layout = "padding-free rows" if self.padding_free else "right-padded rows"
        if self.config.padding_free is None and not able:
            layout += f" ({type(inner).__name__}, attention {implementation!r}, cannot take padding-free rows)"
        loss = "logits at target positions only" if self.loss_fn else "the model's own loss (full logits)"
        return f"batches: {layout}; loss: {loss}"

    def summary(self) -> List[str]:
        return [self.train_lengths.line("training data"), self.eval_lengths.line("held-out data")]

    def data_counts(self) -> dict:
        return {"train": self.train_lengths.counts(), "eval": self.eval_lengths.counts()}

    # --- training batches ----------------------------------------------------------------------------

    def _targets(self, example) -> List[bool]:
        return [True] * len(example.ids) if self.config.train_on_prompt else list(example.response_mask)

    def target_count(self, example) -> int:
        """Tokens the loss counts (position 0 is never predicted)."""
        return len(example.ids) - 1 if self.config.train_on_prompt else example.response_tokens

    def _right_padded(self, examples, targets) -> dict:
        width = max(len(example.ids) for example in examples)
        input_ids = torch.full((len(examples), width), self.tokenizer.pad_id, dtype=torch.long)
        attention = torch.zeros(len(examples), width, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        for row, (example, mask) in enumerate(zip(examples, targets)):
            ids = torch.tensor(example.ids)
            input_ids[row, :len(ids)] = ids
            attention[row, :len(ids)] = 1
            labels[row, :len(ids)] = torch.where(torch.tensor(mask, dtype=torch.bool), ids, torch.full_like(ids, -100))
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def _padding_free(self, examples, targets) -> dict:
        """The micro-batch's examples one after another in a single row, ``position_ids`` restarting
        at each, no attention mask: transformers then masks attention per example (its packed-sequence
        path; ``use_cache=False`` is part of that condition). An example's first token is never a
        target (in a padded row nothing predicts it; here the previous example's last token would)."""
        ids, positions, labels = [], [], []
        for example, mask in zip(examples, targets):
            ids.extend(example.ids)
            positions.extend(range(len(example.ids)))
            labels.extend([-100] + [token if on else -100 for token, on in zip(example.ids[1:], mask[1:])])
        row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
        return {"input_ids": row(ids), "position_ids": row(positions), "labels": row(labels), "use_cache": False}

    def batch(self, examples: Sequence, *, global_batch: Sequence = (), share: int = 1) -> dict:
        layout = self._padding_free if self.padding_free else self._right_padded
        batch = layout(examples, [self._targets(example) for example in examples])
        whole = global_batch or examples
        batch["num_items_in_batch"] = sum(self.target_count(example) for example in whole) / share
        return batch

    # --- evaluation ------------------------------------------------------------------------------------

    def _nll(self, evaluator, chunk, real: int, device) -> tuple:
        """Each real row's summed NLL of its response tokens, and their counts (two lists). Only the
        positions that predict a response token get logits (``logits_to_keep``): the full vocabulary
        at every position would be most of the cost, for a few answer tokens per problem."""
        batch = self._right_padded(chunk, [example.response_mask for example in chunk])
        labels = batch.pop("labels")
        targets = labels[:real, 1:]
        positions = torch.nonzero((targets != -100).any(0)).flatten()  # position t predicts token t + 1
        logits = evaluator.logits(to_device(batch, device), logits_to_keep=positions.to(device))[:real]
        targets = targets[:, positions].to(logits.device)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                              reduction="none").view(targets.shape).sum(1)
        return nll.tolist(), (targets != -100).sum(1).tolist()

    def _generate(self, evaluator, chunk, device) -> List[str]:
        width = max(len(example.prompt_ids) for example in chunk)
        input_ids = torch.full((len(chunk), width), self.tokenizer.pad_id, dtype=torch.long)
        attention = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, example in enumerate(chunk):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(example.prompt_ids):] = torch.tensor(example.prompt_ids)
            attention[row, width - len(example.prompt_ids):] = 1
        output = evaluator.generate(to_device({"input_ids": input_ids, "attention_mask": attention}, device),
                                    max_new_tokens=self.config.max_new_tokens, eos_token_id=self.tokenizer.eos_id,
                                    pad_token_id=self.tokenizer.pad_id)
        texts = []
        for row in output[:, width:].tolist():
            if self.tokenizer.eos_id in row:
                row = row[:row.index(self.tokenizer.eos_id)]
            texts.append(self.tokenizer.decode(row).strip())
        return texts

    def response_nll(self, evaluator, setup, batch_size: int, examples: Optional[Sequence] = None) -> float:
        """Mean negative log-likelihood per response token over ``examples`` (the held-out ones by default)."""
        nll_sum = tokens = 0.0
        examples = self.evaluation if examples is None else examples
        for chunk, real, _ in rank_chunks(examples, setup, batch_size, length=lambda example: len(example.ids)):
            nll, count = self._nll(evaluator, chunk, real, setup.device)
            nll_sum, tokens = nll_sum + sum(nll), tokens + sum(count)
        nll_sum, tokens = all_sum([nll_sum, tokens], setup)
        return nll_sum / tokens

    def exact_match(self, evaluator, setup, batch_size: int, examples: Optional[Sequence] = None) -> tuple:
        """(fraction of greedy generations that match the reference, samples) over ``examples``."""
        examples = self.evaluation if examples is None else examples
        matches = 0.0
        samples = []
        for index, example, text, match in self._matches(evaluator, setup, batch_size, examples):
            matches += match
            if index < self.config.show_generations:
                samples.append({"index": index, "origin": example.origin,
                                "prompt": self.tokenizer.decode(list(example.prompt_ids)), "reference": example.reference,
                                "generation": text, "match": bool(match)})
        return all_sum([matches], setup)[0] / len(examples), gather_samples(samples, setup)

    def scores_by_example(self, evaluator, setup, batch_size: int, examples: Sequence, generate: bool = True) -> dict:
        """Each example's summed response NLL, response token count and (``generate``) match, in the
        order of ``examples``, on rank 0 ({} elsewhere): what a paired comparison of two models on the
        same problems needs, where the means alone cannot tell a real gap from the problems' noise."""
        rows = []
        for chunk, real, indices in rank_chunks(examples, setup, batch_size, length=lambda example: len(example.ids)):
            nll, count = self._nll(evaluator, chunk, real, setup.device)
            rows += [{"index": i, "nll": n, "tokens": c} for i, n, c in zip(indices, nll, count)]
        if generate:
            matched = {index: bool(match) for index, _, _, match in self._matches(evaluator, setup, batch_size, examples)}
            for row in rows:
                row["match"] = matched[row["index"]]
        rows = gather_samples(rows, setup)
        if setup.rank != 0:
            return {}
        return {key: [row[key] for row in rows] for key in ("nll", "tokens") + (("match",) if generate else ())}

    def _matches(self, evaluator, setup, batch_size: int, examples: Sequence):
        """(index, example, generation, match) for this rank's examples, generated in batches."""
        for chunk, real, indices in rank_chunks(examples, setup, batch_size, length=lambda example: len(example.prompt_ids)):
            for index, example, text in zip(indices, chunk, self._generate(evaluator, chunk, setup.device)[:real]):
                yield index, example, text, answers_match(text, example.reference, self.config.answer_match)

    def evaluate(self, evaluator, setup, batch_size: int):
        nll = self.response_nll(evaluator, setup, batch_size)
        exact, samples = self.exact_match(evaluator, setup, batch_size)
        return {"exact_match": exact, "response_nll": nll}, samples
