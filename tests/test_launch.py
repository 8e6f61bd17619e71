"""launch/train.py end to end on the CPU with a random tiny Llama and synthetic sentiment data:
config errors, a local run whose adapter PEFT loads, --init-only equal at world sizes 1 and 2,
kill -9 then --resume reaching the same final adapter, SFT with generation evaluation under FSDP2
(torchrun) and ZeRO-3 (the deepspeed launcher) equal to one process, and the bad inputs the
launcher must name. The SFT data and its bad inputs are in test_sft.py."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny_causal_lm, write_reviews, write_sft_records
from gora_dist import load_adapter
from gora_dist.launcher import checkpoint as ckpt
from gora_dist.launcher.arguments import load_config
from gora_dist.launcher.models import load_model
from gora_dist.launcher.tasks.classification import model_and_encoder
from gora_dist.launcher.tokenizer import load_tokenizer
from gora_dist.launcher.runner import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launch", "train.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """400 synthetic reviews: three sentiment words and three fillers; label = which word list."""
    return write_reviews(str(tmp_path_factory.mktemp("data") / "reviews.jsonl"))


def arguments(data, out, *extra, steps=10):
    return ["--model", "tiny-llama", "--data", data, "--output-dir", str(out), "--steps", str(steps),
            "--train-examples", "300", "--eval-examples", "64", "--lr", "3e-3", "--gora.grad_steps", "4", *extra]


def launch(launcher, world, args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    if launcher == "torchrun":
        command = [shutil.which("torchrun"), "--standalone", "--nproc_per_node", str(world), TRAIN, *args]
    elif launcher == "deepspeed":
        command = [shutil.which("deepspeed"), "--num_gpus", str(world), "--master_port", str(29500 + os.getpid() % 1000),
                   TRAIN, *args]
    else:
        command = [sys.executable, TRAIN, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def adapter_tensors(out, name="adapter"):
    return load_file(os.path.join(out, name, "adapter_model.safetensors"))


def logits_with(adapter_dir, use_peft, model_spec="tiny-llama", **model_kwargs):
    """Logits of a fresh base model with the saved adapter, loaded by PEFT or by gora_dist."""
    model, encoder = model_and_encoder(model_spec, max_length=64, **model_kwargs)
    if use_peft:
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter_dir)
    else:
        load_adapter(model, adapter_dir)
    inputs, _ = encoder.eval_inputs([("good film where is the river", 1), ("awful plot how many of", 0)])
    with torch.no_grad():
        return model(**inputs).logits


# --- config -----------------------------------------------------------------------------------------

def test_unknown_option_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown option 'gora.rank_mx'; did you mean 'gora.rank_max'\?"):
        load_config(["--gora.rank_mx", "8"])
    with pytest.raises(ValueError, match=r"unknown option 'stpes'; did you mean 'steps'\?"):
        load_config(["--stpes", "8"])
    with pytest.raises(ValueError, match=r"engine='zero4' is not one of"):
        load_config(["--engine", "zero4"])
    with pytest.raises(ValueError, match=r"rank_min=9 > rank_max=8"):
        load_config(["--gora.rank_min", "9", "--gora.rank_max", "8"])
    with pytest.raises(ValueError, match=r"engine=zero2 trains but cannot checkpoint yet"):
        load_config(["--engine", "zero2"])


def test_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 7\nlr: 0.01\ngora:\n  rank_max: 12\n  target_modules: [q_proj, v_proj]\n")
    config = load_config([str(path), "--steps", "9", "--gora.gamma", "0.08", "--init-only"])
    assert (config.steps, config.lr, config.init_only) == (9, 0.01, True)
    gora = config.gora
    assert (gora.rank_max, gora.gamma, gora.target_modules) == (12, 0.08, ("q_proj", "v_proj"))
    (tmp_path / "bad.json").write_text(json.dumps({"gora": {"rankmax": 3}}))
    with pytest.raises(ValueError, match="did you mean 'gora.rank_max'"):
        load_config([str(tmp_path / "bad.json")])


# --- runs -------------------------------------------------------------------------------------------

def test_local_run_trains_and_peft_loads_the_adapter(data, tmp_path):
    main(arguments(data, tmp_path, "--checkpoint-every", "5"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["accuracy_after"] > metrics["accuracy_before"] + 0.1
    assert sum(metrics["losses"][-3:]) < sum(metrics["losses"][:3])
    for name in ("init", "adapter"):
        assert sorted(os.listdir(tmp_path / name)) == ["adapter_config.json", "adapter_model.safetensors", "gora.json"]
    assert (tmp_path / "rank_map.png").stat().st_size > 10_000
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-000010"  # the last step is checkpointed too
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-000005", "step-000010"]
    torch.testing.assert_close(logits_with(tmp_path / "adapter", True), logits_with(tmp_path / "adapter", False),
                               rtol=0, atol=1e-6)
    gora = json.loads((tmp_path / "adapter" / "gora.json").read_text())
    assert len(set(gora["rank_map"].values())) > 1


def test_init_only_gives_the_same_adapter_at_world_sizes_1_and_2(data, tmp_path):
    main(arguments(data, tmp_path / "one", "--init-only"))
    result = launch("torchrun", 2, arguments(data, tmp_path / "two", "--init-only", "--engine", "ddp"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "two" / "adapter").exists()
    one, two = adapter_tensors(tmp_path / "one", "init"), adapter_tensors(tmp_path / "two", "init")
    assert one.keys() == two.keys()
    for key in one:
        if "lora_A" in key:
            assert torch.equal(one[key], two[key]), key
        else:  # float32 summation order differs across ranks
            assert torch.linalg.norm(one[key] - two[key]) / torch.linalg.norm(one[key]) < 1e-5, key


def test_kill_9_then_resume_reaches_the_uninterrupted_adapter(data, tmp_path):
    run = arguments(data, tmp_path / "straight", "--checkpoint-every", "40", steps=240)
    main(run)
    killed = arguments(data, tmp_path / "killed", "--checkpoint-every", "40", steps=240)
    process = subprocess.Popen([sys.executable, TRAIN, *killed], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "adapter").exists()
    main(killed + ["--resume"])
    straight, resumed = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "killed")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)  # same data order, same state

    # the same checkpoint resumed at another world size: same data, only summation order differs
    shutil.rmtree(tmp_path / "killed" / "adapter")
    result = launch("torchrun", 2, killed + ["--resume", "--engine", "ddp"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(world size 1 -> 2)" in result.stdout
    other = adapter_tensors(tmp_path / "killed")
    for key in straight:
        assert torch.linalg.norm(other[key] - straight[key]) / torch.linalg.norm(straight[key]) < 1e-4, key


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(data, tmp_path, monkeypatch):
    main(arguments(data, tmp_path, "--checkpoint-every", "5", steps=6))
    before = ckpt.latest_checkpoint(str(tmp_path))
    gora, weights, optimizer, state = ckpt.read_checkpoint(before)
    from gora_dist.report import GoRAPlan
    from gora_dist.report import GoRAReport

    plan = GoRAPlan(GoRAReport.from_dict(gora), {n: w[0] for n, w in weights.items()}, {n: w[1] for n, w in weights.items()})

    def crash(*args, **kwargs):
        raise OSError("killed mid-write")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="killed mid-write"):
        ckpt.write_checkpoint(str(tmp_path), 10, plan, optimizer, state)
    assert ckpt.latest_checkpoint(str(tmp_path)) == before
    assert ckpt.read_checkpoint(before)[3]["step"] == 6
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".tmp")]


def check_sharded_run(launcher, args, out, gain, logits_of):
    """A 2-process run: exit 0, accuracy up by ``gain``, its adapter read alike by PEFT and by us."""
    if launcher == "deepspeed":
        pytest.importorskip("deepspeed")
    result = launch(launcher, 2, args)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["accuracy_after"] > metrics["accuracy_before"] + gain
    torch.testing.assert_close(logits_of(out / "adapter", True), logits_of(out / "adapter", False), rtol=0, atol=1e-6)


# --- supervised fine-tuning: generation evaluation under the sharded engines ---------------------

@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """(data file, model folder): animals' legs and sounds; a tiny Llama with a character tokenizer."""
    folder = tmp_path_factory.mktemp("sft")
    return write_sft_records(str(folder / "animals.jsonl")), save_tiny_causal_lm(str(folder / "model"))


def sft_arguments(sft_data, out, *extra):
    data, model = sft_data
    return ["--model", model, "--task", "sft", "--data", data, "--output-dir", str(out), "--steps", "20",
            "--train-examples", "250", "--eval-examples", "24", "--lr", "1e-2", "--gora.grad_steps", "4",
            "--max-new-tokens", "8", "--show-generations", "24", *extra]


@pytest.fixture(scope="module")
def sft_one_process(sft_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-one")
    main(sft_arguments(sft_data, out, "--checkpoint-every", "0", "--padding-free", "false"))
    return out


def generations(out):
    return [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]


def sft_logits(adapter_dir, model_folder, use_peft):
    ids = load_tokenizer(model_folder).encode("Q: legs of a cow?\nA: 4 legs")
    model = load_model(model_folder)
    if use_peft:
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter_dir)
    else:
        load_adapter(model, adapter_dir)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


@pytest.mark.parametrize("launcher, engine", [("torchrun", "fsdp2"), ("deepspeed", "auto")])
def test_sft_under_sharded_engines_equals_one_process(sft_data, sft_one_process, tmp_path, launcher, engine):
    """World 2 (FSDP2; ZeRO-3 with synced generation), both with activation checkpointing and
    padding-free batches, against one process with neither (padded) on the same global batches.
    Evaluation of the same model (GoRA's init, before training): the same greedy generations and exact
    match, the response NLL equal to float32 summation order. Training clips the gradient norm at 1.0
    by one rule under every engine (DeepSpeed's gradient_clipping set from it), and the norms here
    exceed it: every step's loss and norm equal one process's to float rounding, under ZeRO-3 as under
    FSDP2, and so does the NLL after training. PEFT reads the adapter as we do."""
    if launcher == "deepspeed":
        pytest.importorskip("deepspeed")
    result = launch(launcher, 2, sft_arguments(sft_data, tmp_path, "--engine", engine, "--checkpoint-every", "10",
                                               "--gradient-checkpointing", "--padding-free"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    one = json.loads((sft_one_process / "metrics.json").read_text())
    two = json.loads((tmp_path / "metrics.json").read_text())
    assert two["world_size"] == 2 and (tmp_path / "checkpoints" / "latest").exists()
    assert one["exact_match_after"] > 0.25
    for metrics in (one, two):
        assert metrics["response_nll_after"] < metrics["response_nll_before"] - 2.0
    assert two["exact_match_before"] == one["exact_match_before"]
    assert two["response_nll_before"] == pytest.approx(one["response_nll_before"], rel=1e-5)
    assert [row["before"] for row in generations(tmp_path)] == [row["before"] for row in generations(sft_one_process)]
    # loaded sharded: rank 0 read about half the checkpoint (the rows of each tensor its shards cover)
    loaded = re.search(r"each rank read (?:its own rows|the rows covering its ZeRO-3 partitions).*\(([\d,]+) of ([\d,]+)",
                       result.stdout)
    read, total = (int(number.replace(",", "")) for number in loaded.groups())
    assert total / 2 <= read < 0.6 * total, (read, total)
    assert sum(norm > 1.0 for norm in one["grad_norms"]) >= 3  # clipping acted on several steps
    assert two["losses"] == pytest.approx(one["losses"], rel=2e-4)
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=2e-3)
    assert two["response_nll_after"] == pytest.approx(one["response_nll_after"], rel=1e-3)
    assert two["exact_match_after"] == pytest.approx(one["exact_match_after"], abs=1 / 24)  # at most one flip
    model_folder = sft_data[1]
    torch.testing.assert_close(sft_logits(tmp_path / "adapter", model_folder, True),
                               sft_logits(tmp_path / "adapter", model_folder, False), rtol=0, atol=1e-6)

    # its step-10 checkpoint resumed under another engine (one process) ends where the run ended
    uninterrupted = adapter_tensors(tmp_path)
    shutil.rmtree(tmp_path / "adapter")
    shutil.rmtree(tmp_path / "checkpoints" / "step-000020")
    main(sft_arguments(sft_data, tmp_path, "--engine", "local", "--checkpoint-every", "10", "--padding-free",
                       "--resume"))
    resumed = adapter_tensors(tmp_path)
    for key, value in uninterrupted.items():
        assert torch.linalg.norm(resumed[key] - value) / torch.linalg.norm(value) < 1e-4, key


# --- bad input --------------------------------------------------------------------------------------

def test_too_little_data_for_the_gradient_steps(data, tmp_path):
    with pytest.raises(ValueError, match=r"300 training examples are too few for gora.grad_steps=40 x global_batch_size=8"):
        main(arguments(data, tmp_path, "--gora.grad_steps", "40"))


def test_no_target_module_in_the_model(data, tmp_path):
    with pytest.raises(ValueError, match=r"no module matches target_modules=\['qkv_proj'\]"):
        main(arguments(data, tmp_path / "out", "--gora.target_modules", '["qkv_proj"]', "--init-only"))
    assert not (tmp_path / "out").exists()  # refused after the model loaded: nothing written, not even the folder


def test_resume_with_other_target_modules_is_refused(data, tmp_path):
    main(arguments(data, tmp_path, "--checkpoint-every", "3", steps=4))
    with pytest.raises(ValueError, match=r"cannot resume from .*step-000004: target_modules \[.*\] there, \['q_proj'\] here"):
        main(arguments(data, tmp_path, "--resume", "--gora.target_modules", '["q_proj"]', steps=4))
    with pytest.raises(ValueError, match=r"--resume: no complete checkpoint"):
        main(arguments(data, tmp_path / "empty", "--resume"))


def test_an_engine_that_is_not_installed_is_named(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the launcher sets MASTER_ADDR etc.
    with pytest.raises(ValueError, match=r"engine=zero3 needs DeepSpeed: pip install deepspeed"):
        main(arguments(data, tmp_path, "--engine", "zero3"))


# --- sequence classification: a new head trained in full beside the adapters ------------------------

@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    path = tmp_path_factory.mktemp("data3") / "questions.jsonl"
    rng = random.Random(1)
    words = {"loc": "where city country place river".split(), "num": "how many much number count".split(),
             "hum": "who person man woman name".split()}
    with open(path, "w") as handle:
        for index in range(450):
            label = ["loc", "num", "hum"][index % 3]
            chosen = rng.choices(words[label], k=3) + rng.choices("is the a of".split(), k=2)
            rng.shuffle(chosen)
            handle.write(json.dumps({"text": " ".join(chosen), "label": label}) + "\n")
    return str(path)


def classifier_arguments(data, out, *extra, steps=20):
    return ["--model", "tiny-bert", "--task", "seq-cls", "--data", data, "--output-dir", str(out), "--steps", str(steps),
            "--train-examples", "300", "--eval-examples", "64", "--lr", "1e-2", "--gora.grad_steps", "4", *extra]


def classifier_logits(adapter_dir, use_peft):
    return logits_with(adapter_dir, use_peft, "tiny-bert", task="seq-cls", labels=("hum", "loc", "num"))


def test_seq_cls_trains_the_head_and_resumes_exactly(three_classes, tmp_path):
    main(classifier_arguments(three_classes, tmp_path / "straight"))
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert metrics["accuracy_after"] > metrics["accuracy_before"] + 0.2
    config = json.loads((tmp_path / "straight" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    tensors = adapter_tensors(tmp_path / "straight")
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= tensors.keys()
    torch.testing.assert_close(classifier_logits(tmp_path / "straight" / "adapter", True),
                               classifier_logits(tmp_path / "straight" / "adapter", False), rtol=0, atol=1e-6)
    # stop after the step-10 checkpoint (its adapter removed), resume: same final adapter and head
    main(classifier_arguments(three_classes, tmp_path / "resumed", "--checkpoint-every", "10"))
    shutil.rmtree(tmp_path / "resumed" / "adapter")
    main(classifier_arguments(three_classes, tmp_path / "resumed", "--resume"))
    resumed = adapter_tensors(tmp_path / "resumed")
    assert all(torch.equal(tensors[key], resumed[key]) for key in tensors)


@pytest.mark.parametrize("launcher, engine", [("torchrun", "fsdp2"), ("deepspeed", "auto")])
def test_seq_cls_under_sharded_engines(three_classes, tmp_path, launcher, engine):
    args = classifier_arguments(three_classes, tmp_path, "--engine", engine, "--checkpoint-every", "10")
    check_sharded_run(launcher, args, tmp_path, 0.2, classifier_logits)


def test_zero2_trains(data, tmp_path):
    args = arguments(data, tmp_path, "--engine", "zero2", "--checkpoint-every", "0")
    check_sharded_run("deepspeed", args, tmp_path, 0.1, logits_with)


def test_zero3_resume_continues_where_the_checkpoint_left_off(data, tmp_path):
    """Under the deepspeed launcher: a run with a step-5 checkpoint, then a resume from that checkpoint
    (its final adapter removed) must reach the same final adapter."""
    args = arguments(data, tmp_path, "--engine", "zero3", "--checkpoint-every", "5")
    check_sharded_run("deepspeed", args, tmp_path, 0.1, logits_with)
    straight = adapter_tensors(tmp_path)
    shutil.rmtree(tmp_path / "adapter")
    result = launch("deepspeed", 2, args + ["--resume"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    resumed = adapter_tensors(tmp_path)
    for key in straight:
        assert torch.linalg.norm(resumed[key] - straight[key]) / torch.linalg.norm(straight[key]) < 1e-5, key
