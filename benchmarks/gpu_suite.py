#!/usr/bin/env python3
"""Every GPU check and benchmark in one prepared run, under a time limit it enforces: for the first
minutes of a lent GPU, which must go to measuring, not to debugging a script.

    bash benchmarks/gpu_suite.sh --out "$OUT"         # on the GPU machine, its own python3, nothing installed
    python benchmarks/gpu_suite.py --dry-run           # CPU: Triton's interpreter, tiny shapes, no timing claimed (CI)

Steps, in this order, each in its own child process (a CUDA fault or a hang costs that step only),
each given what is left of ``--budget-s`` (default 450 s) less what the later steps are owed:
  1. environment: GPU, driver, torch/triton/transformers/peft versions, and two ceilings (a large
     device-to-device copy, a large bf16 matmul);
  2. gpu tests: tests/test_kernel_*.py's GPU cases (kernels against references in bf16 at real sizes,
     GoRALinear's kernel path, the pinv init);
  3. kernels: benchmarks/kernel_speed.py --quick (fused vs torch vs PEFT; grouped q/k/v; B0 for 224 layers);
  4. init: GoRA on a ~1.2B random-weight Llama (Llama-3.2-1B's shapes) in bf16 on one GPU, kernels on
     then off: seconds of the gradient steps and of everything after, peak allocated memory per phase;
  5. sft steps: a few SFT training steps of that model as the launcher trains (padding-free rows,
     logits only at the response positions), kernels on and off: tokens/s, peak memory, model
     TFLOP/s and MFU (gora_dist/launcher/flops.py);
  6. trainer_fsdp2: a transformers Trainer asked for FSDP2 on the GPU with the model GoRA sharded
     itself (tests/dist/trainer_worker.py device, one rank under torchrun): the plan against one
     process's, the losses, the base unchanged, the adapter loaded in PEFT;
  7. sharded_svd: the sharded randomized SVD (LoRA-GA, LoRA-One, PiSSA) at Llama-3.2-1B's target
     shapes beside torch.linalg.svd and torch.svd_lowrank (benchmarks/sharded_svd_speed.py).
Results are rewritten after every step to <out>/gpu_<device>.{json,md} (machine, versions, commit,
date), so a run cut off still returns what it measured; a short table is printed last. A step that
needs a missing package (deepspeed is not on the lent machine) is not run here at all: the suite has
none; a failed or timed-out step is recorded with its output's tail and the next step runs.
gpu_suite_report.py writes the result files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the checkout, imported from its path: nothing is installed on the lent machine
sys.path.insert(0, HERE)

from provenance import git_commit, git_dirty, package_versions  # noqa: E402
from gpu_suite_report import markdown, write  # noqa: E402
from timing import sync, timed  # noqa: E402

PACKAGES = ("torch", "triton", "transformers", "peft", "accelerate", "safetensors", "deepspeed")
# Llama-3.2-1B's shapes (hidden, intermediate, layers, heads, kv heads, vocab), tied embeddings: 1.24 B parameters
MODEL_1B = dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256)
MODEL_TINY = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ── the steps, each run in a child: python gpu_suite.py --step NAME --result FILE [--dry-run] ──

def checkout_env(*paths: str) -> dict:
    """This environment with the checkout (and ``paths``) first on PYTHONPATH: nothing is installed."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, *paths, os.environ.get("PYTHONPATH")])))


def step_environment(dry_run: bool) -> dict:
    import torch

    found = {"python": platform.python_version(), "packages": package_versions(*PACKAGES),
             "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}", memory_gib=props.total_memory / 2**30,
                     multiprocessors=props.multi_processor_count, devices=torch.cuda.device_count())
        try:
            found["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                             capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            found["driver"] = None
    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    elements = (2 << 20) if dry_run else (1 << 30)  # bf16: 4 MiB or 2 GiB per buffer
    source = torch.empty(elements, dtype=torch.bfloat16, device=device).normal_()
    target = torch.empty_like(source)
    seconds = timed(lambda: target.copy_(source), repeats=3 if dry_run else 10)
    found["copy_gbps"] = 2 * source.numel() * source.element_size() / seconds / 1e9  # bytes read + written
    size = 256 if dry_run else 8192
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    seconds = timed(lambda: a @ b, repeats=3 if dry_run else 10, warmup=1 if dry_run else 3)
    found["matmul_tflops"] = 2 * size**3 / seconds / 1e12
    found["matmul_size"], found["copy_bytes"] = size, source.numel() * source.element_size()
    return found


def step_gpu_tests(dry_run: bool, out: str) -> dict:
    """tests/test_kernel_*.py's GPU cases, in-process on CUDA (on the CPU they skip: the dry run checks the command)."""
    log = os.path.join(out, "gpu_tests.log")
    # "without_a_gpu": the sm_90 compile check, which the CPU test suite runs already
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-k", "gpu and not without_a_gpu",
               *[os.path.join(ROOT, "tests", f"test_kernel_{n}.py") for n in ("matmul", "lora", "grouped", "pinv", "dispatch")], "-rs", "--durations=10"]
    env = checkout_env()
    env.pop("TRITON_INTERPRET", None)
    # straight into the log, test by test: a run cut off at its limit still says how far it got
    with open(log, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    with open(log) as handle:
        lines = handle.read().strip().splitlines()
    summary = lines[-1] if lines else "(no output)"
    counts = {}
    for part in summary.strip("= ").split(","):
        words = part.split()
        if len(words) >= 2 and words[0].isdigit():
            counts[words[1]] = int(words[0])
    return {"returncode": result.returncode, "summary": summary, "counts": counts, "log": os.path.basename(log),
            "ok": result.returncode == 0 and not counts.get("failed") and not counts.get("error")}


def step_kernels(dry_run: bool, out: str) -> dict:
    command = [sys.executable, os.path.join(HERE, "kernel_speed.py"), "--dry-run" if dry_run else "--quick",
               "--results", out]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"benchmarks/kernel_speed.py exited {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}")
    written = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("wrote ")]
    stem = written[0][:-len(".json")] if written else None
    found = {"results": os.path.basename(stem) if stem else None}
    if stem:
        with open(stem + ".json") as handle:
            data = json.load(handle)
        found["layers"] = [{k: row[k] for k in ("kind", "rank", "tokens", "impl", "forward_ms", "backward_ms", "full_ms")}
                           for row in data["layers"]]
        found["init"] = data["init"]
    return found


def _model(spec: dict, device: str, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                         num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                         num_key_value_heads=spec["kv_heads"], tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model


def _batches(spec: dict, count: int, batch: int, length: int, response: int, device: str, seed: int) -> List[dict]:
    """Random-token SFT batches: the loss counts the last ``response`` tokens of each row only."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    found = []
    for _ in range(count):
        ids = torch.randint(0, spec["vocab"], (batch, length), generator=generator)
        labels = ids.clone()
        labels[:, :length - response] = -100
        found.append({"input_ids": ids.to(device), "labels": labels.to(device)})
    return found


def _padding_free(batch: dict) -> dict:
    """A batch's rows one after another in a single row, positions restarting per row, no mask (the
    launcher's padding-free layout); each example's first label off, as nothing before it predicts it."""
    import torch

    rows, length = batch["input_ids"].shape
    labels = batch["labels"].clone()
    labels[:, 0] = -100
    positions = torch.arange(length, device=labels.device).repeat(rows)
    return {"input_ids": batch["input_ids"].reshape(1, -1), "labels": labels.reshape(1, -1),
            "position_ids": positions.unsqueeze(0), "use_cache": False}


def _sizes(dry_run: bool) -> dict:
    if dry_run:
        return dict(spec=MODEL_TINY, batch=2, length=16, response=4, grad_steps=2, train_steps=2, warmup_steps=1)
    return dict(spec=MODEL_1B, batch=4, length=1024, response=256, grad_steps=8, train_steps=10, warmup_steps=2)


def _peak_gib() -> Optional[float]:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _gora(model, sizes: dict, device: str):
    """GoRA on the model (rank_ref 8 in [4, 32], γ 5e-2, all 7 projections): the report and phase figures."""
    from gora_dist import GoRAConfig, apply_gora

    batches = _batches(sizes["spec"], sizes["grad_steps"], sizes["batch"], sizes["length"], sizes["response"], device, 1)
    config = GoRAConfig(target_modules=TARGETS, rank_ref=8, rank_min=4, rank_max=32, alpha=16.0, gamma=5e-2,
                        grad_steps=sizes["grad_steps"])
    sync()
    start = time.perf_counter()
    from gora_dist.memory_trace import phase

    report = apply_gora(model, batches, config, on_phase=phase)
    sync()
    total = time.perf_counter() - start
    return report, total


def step_init(dry_run: bool, kernels: bool) -> dict:
    """GoRA's init on one device: the gradient steps, then everything after them, and peak memory of each."""
    import torch

    from gora_dist.memory_trace import phase, write_now

    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sizes = _sizes(dry_run)
    _reset_peak()
    model = _model(sizes["spec"], device, dtype)
    loaded = _peak_gib()
    phase("gradient steps")  # GoRA's pipeline enters "init" itself once the gradients are summed
    report, total = _gora(model, sizes, device)
    write_now()
    found = {"kernels": kernels, "device": device, "dtype": str(dtype).replace("torch.", ""),
             "parameters": sum(p.numel() for p in model.parameters() if not p.requires_grad),
             "adapter_parameters": report.param_count, "grad_steps": report.grad_steps,
             "tokens_per_step": sizes["batch"] * sizes["length"], "gradient_s": report.timings["gradient_s"],
             "after_gradients_s": total - report.timings["gradient_s"], "model_gib": loaded,
             "rank_map": report.rank_map}
    found["after_over_gradient"] = found["after_gradients_s"] / found["gradient_s"]
    trace = os.path.join(os.environ["GORA_MEMORY_TRACE"], "rank0.json")
    with open(trace) as handle:
        for entry in json.load(handle)["phases"]:
            if entry["name"] in ("gradient steps", "init") and "cuda_max_allocated" in entry:
                found[f"peak_gib_{entry['name'].replace(' ', '_')}"] = entry["cuda_max_allocated"] / 2**30
    return found


def step_sft(dry_run: bool, kernels: bool) -> dict:
    """A few AdamW steps on GoRA's adapters after its init, as the launcher trains: padding-free rows
    (the model's packed-sequence attention) and the SFT loss with logits at the response positions
    only; tokens/s, peak memory, model TFLOP/s and MFU (launcher/flops.py)."""
    import torch

    from gora_dist.launcher.flops import model_shape, peak_flops, step_flops
    from gora_dist.launcher.tasks.sft_loss import response_loss

    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sizes = _sizes(dry_run)
    model = _model(sizes["spec"], device, dtype)
    report, _ = _gora(model, sizes, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    steps = sizes["warmup_steps"] + sizes["train_steps"]
    batches = [_padding_free(batch) for batch in
               _batches(sizes["spec"], steps, sizes["batch"], sizes["length"], sizes["response"], device, 2)]
    model.train()
    losses = []
    for index, batch in enumerate(batches):
        if index == sizes["warmup_steps"]:
            sync()
            _reset_peak()
            start = time.perf_counter()
        loss = response_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    sync()
    seconds = time.perf_counter() - start
    tokens = sizes["train_steps"] * sizes["batch"] * sizes["length"]
    shape = model_shape(model)
    flops = step_flops(shape, sizes["batch"] * sizes["length"], sizes["batch"] * sizes["length"] ** 2,
                       sizes["batch"] * sizes["response"]) * sizes["train_steps"] / seconds
    peak, peak_source = peak_flops(torch.device(device), shape.dtype)
    return {"layout": "padding-free", "model_tflops_per_s": flops / 1e12, "mfu": flops / peak if peak else None, "peak_source": peak_source,
            "kernels": kernels, "device": device, "steps": sizes["train_steps"], "tokens_per_step":
            sizes["batch"] * sizes["length"], "s_per_step": seconds / sizes["train_steps"], "tokens_per_s": tokens / seconds,
            "peak_gib": _peak_gib(), "losses": losses, "finite": all(math.isfinite(v) for v in losses),
            "adapter_parameters": report.param_count}


def step_trainer_fsdp2(dry_run: bool, out: str) -> dict:
    """The Trainer with FSDP2 on the GPU, the model sharded by GoRA (tests/dist/trainer_worker.py device,
    one rank under torchrun): its plan against one process's, the losses, what stayed unchanged."""
    import torch

    from gora_dist.launcher.processes import free_port

    folder = tempfile.mkdtemp(prefix="gora-suite-trainer-")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
               str(free_port()), os.path.join(ROOT, "tests", "dist", "trainer_worker.py"), "device", folder]
    env = checkout_env(os.path.join(ROOT, "tests"))
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    with open(os.path.join(out, "trainer_fsdp2.log"), "w") as handle:
        handle.write(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"trainer_worker.py device exited {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}")
    with open(os.path.join(folder, "trainer_fsdp2_device", "rank0.json")) as handle:
        facts = json.load(handle)
    reference = facts["reference"]
    gap = max(float((torch.tensor(facts[key][name]) - torch.tensor(reference[key][name])).abs().max())
              for key in ("lora_a", "lora_b") for name in facts[key])
    losses = facts["losses"]
    return {"device": facts["device"], "engine": facts["engine"], "fsdp_plugin": facts["fsdp_plugin"], "sharded_weights": facts["sharded_weights"],
            "rank_map_equal": facts["rank_map"] == reference["rank_map"], "max_adapter_gap": gap,
            "first_loss": losses[0], "last_loss": losses[-1], "base_unchanged": facts["base_unchanged"],
            "peft_loaded_layers": facts["peft_loaded"], "held_elements": facts["held_elements"],
            "target_elements": facts["target_elements"],
            "ok": bool(facts["rank_map"] == reference["rank_map"] and gap < 1e-4 and losses[-1] < losses[0]
                       and facts["base_unchanged"] and facts["peft_loaded"] > 0 and facts["fsdp_plugin"]
                       and facts["sharded_weights"])}


def step_sharded_svd(dry_run: bool) -> dict:
    """benchmarks/sharded_svd_speed.py's measure(): seconds per target shape and rank, whole matrix and one
    rank's slice at world 8, beside the exact SVD and svd_lowrank, with the error and the bytes."""
    import torch

    from sharded_svd_speed import LLAMA_1B, SMALL, measure, whole_model

    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    spec = SMALL if dry_run else LLAMA_1B
    rows = measure(spec, device, ranks=(8, 16) if dry_run else (8, 16, 64), repeats=1 if dry_run else 3)
    return {"device": device, "rows": rows, "whole_model": whole_model(spec, rows),
            "ok": all(row["max_rel_error"] < 5e-2 for row in rows)}


CHILD_STEPS = {
    "environment": lambda o: step_environment(o.dry_run),
    "gpu_tests": lambda o: step_gpu_tests(o.dry_run, o.out),
    "kernels": lambda o: step_kernels(o.dry_run, o.out),
    "init_kernels_on": lambda o: step_init(o.dry_run, True),
    "init_kernels_off": lambda o: step_init(o.dry_run, False),
    "sft_kernels_on": lambda o: step_sft(o.dry_run, True),
    "sft_kernels_off": lambda o: step_sft(o.dry_run, False),
    "trainer_fsdp2": lambda o: step_trainer_fsdp2(o.dry_run, o.out),
    "sharded_svd": lambda o: step_sharded_svd(o.dry_run),
}
# (step, the seconds it may take at most, the seconds kept for it while earlier steps run)
PLAN = [("environment", 60, 20), ("gpu_tests", 150, 60), ("kernels", 150, 60), ("init_kernels_on", 90, 40),
        ("init_kernels_off", 90, 40), ("sft_kernels_on", 120, 30), ("sft_kernels_off", 60, 30),
        ("trainer_fsdp2", 90, 45), ("sharded_svd", 75, 25)]


# ── the parent: budget, children, results ──

def run_child(name: str, options, limit_s: float) -> dict:
    """Run one step in a child process within ``limit_s``; its result, or why there is none."""
    result_file = os.path.join(options.out, f".step_{name}.json")
    env = checkout_env()
    env["PYTHONUNBUFFERED"] = "1"
    if name.endswith("kernels_off"):
        env["GORA_DISABLE_KERNELS"] = "1"
        env.pop("GORA_KERNELS", None)
    else:  # the kernels run on CUDA only when asked for
        env.pop("GORA_DISABLE_KERNELS", None)
        env["GORA_KERNELS"] = "1"
    if options.dry_run and name != "gpu_tests":
        env["TRITON_INTERPRET"] = "1"  # the kernel path runs on the CPU, before any kernel module is imported
    env["GORA_MEMORY_TRACE"] = tempfile.mkdtemp(prefix=f"gora-suite-{name}-")
    command = [sys.executable, os.path.abspath(__file__), "--step", name, "--result", result_file, "--out", options.out]
    command += ["--dry-run"] if options.dry_run else []
    start = time.perf_counter()
    # its own process group: a step cut off takes its children (kernel_speed.py, torchrun's worker) with it,
    # so nothing it started keeps the GPU busy during the next step
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=limit_s)
        status = "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        status = f"timed out after {limit_s:.0f} s"
    tail = (stdout + stderr)[-2500:]
    entry = {"status": status, "wall_s": time.perf_counter() - start}
    if status == "ok" and os.path.exists(result_file):
        with open(result_file) as handle:
            entry["result"] = json.load(handle)
        os.remove(result_file)
        if entry["result"].get("ok") is False:  # it ran, and its own checks failed
            entry["status"] = "checks failed"
    else:
        entry["output_tail"] = tail
    return entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes (CI)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results; a temporary one "
                                                    "for --dry-run)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="the whole suite's time limit in seconds")
    parser.add_argument("--only", default=None, help="comma-separated subset of the steps (to rerun what failed)")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # a child: run this step
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    options.out = os.path.abspath(options.out or (tempfile.mkdtemp(prefix="gora-gpu-suite-dry-run-") if options.dry_run
                                                  else os.path.join(ROOT, "benchmarks", "results")))
    os.makedirs(options.out, exist_ok=True)
    if options.step:
        found = CHILD_STEPS[options.step](options)
        with open(options.result, "w") as handle:
            json.dump(found, handle)
        return 0

    plan = PLAN
    if options.only:
        chosen = [s.strip() for s in options.only.split(",")]
        unknown = [s for s in chosen if s not in CHILD_STEPS]
        if unknown:
            parser.error(f"--only: unknown {unknown}; steps are {list(CHILD_STEPS)}")
        plan = [entry for entry in PLAN if entry[0] in chosen]
    import torch

    if not options.dry_run and not torch.cuda.is_available():
        print("benchmarks/gpu_suite.py found no CUDA GPU; nothing was measured. Pass --dry-run to check it on the CPU.")
        return 2
    started = time.perf_counter()
    record = {"dry_run": options.dry_run, "commit": (git_commit() or "unknown") + ("+dirty" if git_dirty(untracked=False) else ""),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "budget_s": options.budget_s,
              "command": "python3 benchmarks/gpu_suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.node()}, {os.cpu_count()} CPU cores", "steps": {}}
    for index, (name, cap_s, _) in enumerate(plan):
        left = options.budget_s - (time.perf_counter() - started)
        owed = sum(kept for _, _, kept in plan[index + 1:])
        # the dry run (the interpreter on 2 cores) keeps no step caps: only the whole budget counts
        limit = left if options.dry_run else min(cap_s, left - owed)
        if limit < 5:
            record["steps"][name] = {"status": f"not run: {left:.0f} s left of the budget", "wall_s": 0.0}
            continue
        print(f"[gpu suite] {name} (up to {limit:.0f} s)", flush=True)
        record["steps"][name] = run_child(name, options, limit)
        record["used_s"] = time.perf_counter() - started
        stem = write(record, options.out)
        print(f"[gpu suite] {name}: {record['steps'][name]['status']} in {record['steps'][name]['wall_s']:.1f} s", flush=True)
    record["used_s"] = time.perf_counter() - started
    stem = write(record, options.out)
    text = markdown(record)
    print(text)
    print(f"wrote {stem}.json and {stem}.md")
    return 0 if all(entry["status"] == "ok" for entry in record["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
