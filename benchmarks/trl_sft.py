#!/usr/bin/env python
"""TRL's own ``trl/scripts/sft.py`` with GoRA's two lines, run as a user runs it: under the
``deepspeed`` launcher (ZeRO-3) and under ``torchrun`` (DDP), 2 CPU ranks, on a real model and data.

    python benchmarks/trl_sft.py                 # both launches, 10 steps each (about 10 minutes on 2 cores)
    python benchmarks/trl_sft.py --steps 4 --launches ddp

The script is copied from the installed TRL with exactly two lines added after ``SFTTrainer(...)``
(checked here: the diff is printed into the results). The model is the packaged SmolLM2-135M-Instruct
(offline-assets.md; dequantised from its GGUF into a plain folder, which TRL takes by name), the data
ASDiv's problems as chat ``messages`` (TRL renders them with SmolLM2's chat template and trains on the
assistant turn). Per launch: the exit status, GoRA's one log line (ranks, budget, seconds of
estimation), the logged losses and gradient norms, TRL's train_runtime, the wall time and the saved
adapter's ``rank_pattern``. Results: benchmarks/results/trl_sft_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from provenance import git_commit, git_dirty, package_versions  # noqa: E402

TWO_LINES = ("    from gora_dist.integrations import prepare_trainer\n", "    prepare_trainer(trainer)\n")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GLOO_FIRST = '''"""CPU ranks only: the gloo group started before the script parses its arguments (accelerate does
not start it under the deepspeed launcher on the CPU); then the script runs as it is."""
import runpy, sys
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
sys.argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
runpy.run_path(sys.argv[0], run_name="__main__")
'''
ZERO3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
         "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto"}


def trl_script_with_gora(work: str) -> list:
    """sft.py = TRL's installed script plus the two lines after the trainer is built; returns the diff."""
    import trl

    original = open(os.path.join(os.path.dirname(trl.__file__), "scripts", "sft.py")).read().splitlines(True)
    built = next(i for i, line in enumerate(original) if line.strip().startswith("trainer = SFTTrainer("))
    closing = next(i for i in range(built, len(original)) if original[i].rstrip() == "    )")
    changed = original[:closing + 1] + list(TWO_LINES) + original[closing + 1:]
    with open(os.path.join(work, "sft.py"), "w") as f:
        f.writelines(changed)
    diff = [line for line in difflib.unified_diff(original, changed, "trl/scripts/sft.py", "sft.py", n=0)]
    added = [line for line in diff if line.startswith("+") and not line.startswith("+++")]
    removed = [line for line in diff if line.startswith("-") and not line.startswith("---")]
    assert len(added) == 2 and not removed, diff
    return diff


def assets(work: str) -> tuple:
    """(model folder, data folder): SmolLM2-135M-Instruct as a plain folder, ASDiv as chat records."""
    from gora_dist.launcher.model_sources import SMOLLM2_FILE, smollm2_folder
    from gora_dist.launcher.tasks.sft_data import asdiv_records

    model = os.path.join(work, "smollm2-135m")
    if not os.path.isfile(os.path.join(model, "config.json")):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        loaded = AutoModelForCausalLM.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_FILE)
        plain = AutoModelForCausalLM.from_config(loaded.config)
        plain.load_state_dict(loaded.state_dict())
        plain.config.quantization_config = None
        plain.save_pretrained(model)
        AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_FILE).save_pretrained(model)
    data = os.path.join(work, "asdiv")
    os.makedirs(data, exist_ok=True)
    with open(os.path.join(data, "train.jsonl"), "w") as f:
        for _, record in asdiv_records():
            f.write(json.dumps({"messages": [{"role": "user", "content": record["prompt"]},
                                             {"role": "assistant", "content": record["completion"].strip()}]}) + "\n")
    return model, data


def launch_line(launch: str, work: str, model: str, data: str, steps: int) -> list:
    script = ["sft.py", "--model_name_or_path", model, "--dataset_name", data, "--use_peft", "--lora_r", "8",
              "--lora_alpha", "16", "--lora_target_modules", *TARGETS, "--per_device_train_batch_size", "4",
              "--gradient_accumulation_steps", "2", "--max_steps", str(steps), "--learning_rate", "2e-4",
              "--max_length", "256", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
              "--bf16", "false", "--use_cpu", "--output_dir", os.path.join(work, f"out_{launch}")]
    if launch == "zero3":
        return ["deepspeed", "--num_gpus", "2", "gloo_first.py", *script, "--deepspeed", "ds_zero3.json"]
    return ["torchrun", "--nproc_per_node", "2", *script]


def run_launch(launch: str, work: str, model: str, data: str, steps: int) -> dict:
    command = launch_line(launch, work, model, data, steps)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=ROOT)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    log = done.stdout + done.stderr
    with open(os.path.join(work, f"{launch}.log"), "w") as f:
        f.write(log)
    logged = [ast.literal_eval(m) for m in re.findall(r"\{'loss'[^}]*\}", log)]
    runtime = [ast.literal_eval(m) for m in re.findall(r"\{'train_runtime'[^}]*\}", log)]
    gora = sorted(set(re.findall(r"GoRA: \d+ layers[^\n]*", log)))
    adapter = os.path.join(work, f"out_{launch}", "adapter_config.json")
    pattern = json.load(open(adapter))["rank_pattern"] if done.returncode == 0 and os.path.isfile(adapter) else None
    return {"launch": launch, "command": " ".join(command), "returncode": done.returncode, "wall_s": round(wall, 1),
            "gora_line": gora, "losses": [float(e["loss"]) for e in logged],
            "grad_norms": [float(e["grad_norm"]) for e in logged],
            "train_runtime_s": float(runtime[0]["train_runtime"]) if runtime else None,
            "rank_pattern": pattern, "log_tail": log[-2000:] if done.returncode else ""}


def report(result: dict) -> str:
    runs = result["runs"]
    lines = [f"# TRL's sft.py with two added lines ({result['date']}, commit {result['commit']}"
             f"{' + uncommitted changes' if result['dirty'] else ''})", "",
             f"`python benchmarks/trl_sft.py --steps {result['steps']}`: 2 CPU ranks (gloo), {result['machine']}; "
             f"SmolLM2-135M-Instruct (fp32 folder), ASDiv as chat messages, LoRA r=8 alpha 16 on "
             f"{len(TARGETS)} projections, batch 4 per rank x accumulation 2, max_length 256. Packages: "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".", "",
             "The change to TRL's script:", "", "```diff", *[line.rstrip("\n") for line in result["diff"]], "```", "",
             "| launch | rc | GoRA's line | losses (first → last) | train_runtime s | wall s |", "|---|---|---|---|---|---|"]
    for run in runs:
        losses = f"{run['losses'][0]:.3f} → {run['losses'][-1]:.3f} ({len(run['losses'])} steps)" if run["losses"] else "-"
        lines.append(f"| {run['launch']} | {run['returncode']} | {'; '.join(run['gora_line'])} | {losses} | "
                     f"{run['train_runtime_s']} | {run['wall_s']} |")
    patterns = [run["rank_pattern"] for run in runs if run["rank_pattern"] is not None]
    if len(patterns) > 1:
        lines += ["", f"Saved `rank_pattern` identical across launches: {all(p == patterns[0] for p in patterns)}; "
                  f"logged losses identical to TRL's printed digits: "
                  f"{all(run['losses'] == runs[0]['losses'] for run in runs)}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--launches", nargs="+", default=["zero3", "ddp"], choices=["zero3", "ddp"])
    parser.add_argument("--work", default="/tmp/gora_trl_sft", help="model folder, data, logs, outputs")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    diff = trl_script_with_gora(args.work)
    with open(os.path.join(args.work, "gloo_first.py"), "w") as f:
        f.write(GLOO_FIRST)
    json.dump(ZERO3, open(os.path.join(args.work, "ds_zero3.json"), "w"))
    model, data = assets(args.work)
    runs = []
    for launch in args.launches:
        runs.append(run_launch(launch, args.work, model, data, args.steps))
        print(f"{launch}: rc {runs[-1]['returncode']}, {runs[-1]['gora_line']}, losses {runs[-1]['losses']}", flush=True)
    import platform

    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
              "dirty": git_dirty("gora_dist", "benchmarks"), "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
              "versions": package_versions("torch", "transformers", "trl", "peft", "accelerate", "deepspeed"),
              "steps": args.steps, "diff": diff, "runs": runs}
    os.makedirs(args.results, exist_ok=True)
    json.dump(result, open(os.path.join(args.results, "trl_sft_cpu.json"), "w"), indent=1)
    with open(os.path.join(args.results, "trl_sft_cpu.md"), "w") as f:
        f.write(report(result))
    sys.exit(max(run["returncode"] for run in runs) != 0)


if __name__ == "__main__":
    main()
