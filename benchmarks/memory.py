"""Peak memory per phase of the launcher under ZeRO-3 (deepspeed) and FSDP2 (torchrun), at world
sizes 1, 2 and 4, for a random-weight Llama of about half a billion parameters saved as a local
safetensors folder. Each run is the real launcher (`launch/train.py --task sft`) with
GORA_MEMORY_TRACE set (gora_dist/memory_trace.py): every rank samples its resident memory and
glibc's in-use heap (mallinfo2) per phase. The same runs with a tiny model of the same family give
the torch/DeepSpeed runtime's own memory, reported apart and subtracted.

    python benchmarks/memory.py                       # all runs (CPU, gloo: ~20 min on 2 cores)
    python benchmarks/memory.py --worlds 1 2 --engines fsdp2 --quick   # tiny shapes, a check that it runs

On the CPU glibc keeps freed buffers resident; every run sets MALLOC_MMAP_THRESHOLD_=131072, so any
buffer above 128 KiB is its own mapping and is returned on free: resident memory then follows live
memory (the heap column is glibc's own count, independent of that setting).

Writes benchmarks/results/memory_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # provenance.py, beside this file
sys.path.insert(0, ROOT)  # gora_dist from the checkout

from provenance import git_commit, git_dirty, package_versions  # noqa: E402

from gora_dist.launcher.processes import free_port  # noqa: E402

PHASES = ("load", "gradient steps", "init", "training setup", "evaluation", "training", "checkpoint", "final adapter")
GIB = 2**30

# ~0.54 B parameters: 12 blocks of 45 M (hidden 2048, MLP 5632, GQA 16/4 heads), a character vocabulary
BIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4)
QUICK = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
# DeepSpeed keeps up to stage3_max_live_parameters (default 1e9) gathered and prefetches within
# stage3_max_reuse_distance (1e9): the whole of this model. At 70B a block has 0.86 B parameters, so
# the defaults are about one block there; here they are set to about one block of this model.
ZERO3_LIMITS = {"zero_optimization": {"stage3_max_live_parameters": 5e7, "stage3_max_reuse_distance": 5e7,
                                      "stage3_prefetch_bucket_size": 5e7}}
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def save_random_llama(folder: str, shape: dict) -> dict:
    """A random-weight Llama with a character-level tokenizer (and chat template) in ``folder``;
    returns its sizes in bytes (float32): whole model, one block, target weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gora_dist.launcher.tokenizer import character_tokenizer

    tokenizer = character_tokenizer("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                    "{% if add_generation_prompt %}assistant: {% endif %}")
    vocab = tokenizer.get_vocab()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), max_position_embeddings=256, tie_word_embeddings=False,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, **shape)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    targets = sum(m.weight.numel() for n, m in model.named_modules()
                  if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    return {"parameters": sum(p.numel() for p in model.parameters()), "model_bytes": 4 * sum(p.numel() for p in model.parameters()),
            "block_bytes": 4 * block, "target_bytes": 4 * targets, "shape": shape}


def write_data(path: str, count: int = 64) -> None:
    import random

    generator = random.Random(0)
    with open(path, "w") as handle:
        for _ in range(count):
            a, b = generator.randint(10, 99), generator.randint(10, 99)
            handle.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")


def launch(engine: str, world: int, model: str, data: str, out: str, trace: str, timeout: int) -> float:
    env = dict(os.environ, GORA_MEMORY_TRACE=trace, MALLOC_MMAP_THRESHOLD_="131072", DS_ACCELERATOR="cpu",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // world)))
    train = os.path.join(ROOT, "launch", "train.py")
    arguments = ["--task", "sft", "--data", data, "--model", model, "--output-dir", out, "--steps", "2",
                 "--checkpoint-every", "1", "--global-batch-size", str(world), "--max-length", "32",
                 "--eval-examples", str(2 * world), "--max-new-tokens", "2", "--show-generations", "0",
                 "--gora.grad_steps", "2", "--precision", "fp32"]
    if engine == "zero3":
        ds_config = os.path.join(os.path.dirname(out), "ds_config.json")
        with open(ds_config, "w") as handle:
            json.dump(ZERO3_LIMITS, handle)
        arguments += ["--ds-config", ds_config]
        command = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(world), "--master_port", str(free_port()), train]
    else:
        command = [shutil.which("torchrun") or "torchrun", "--standalone", "--nproc_per_node", str(world), train,
                   "--engine", engine]
    started = time.perf_counter()
    result = subprocess.run(command + arguments, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{engine} world {world} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return time.perf_counter() - started


def largest_rank(trace: str, world: int) -> dict:
    """{phase: {rss, heap}} — the largest value over the ranks, per phase."""
    peaks: dict = {}
    for rank in range(world):
        with open(os.path.join(trace, f"rank{rank}.json")) as handle:
            for entry in json.load(handle)["phases"]:
                slot = peaks.setdefault(entry["name"], {"rss": 0, "heap": 0})
                slot["rss"] = max(slot["rss"], entry["rss"])
                slot["heap"] = max(slot["heap"], entry["heap"])
    return peaks


def bound_bytes(phase: str, sizes: dict, world: int) -> int:
    """The goal for the largest rank's model-dependent peak: its share of the weights plus one whole
    block (the one gathered for compute); in the gradient steps and init also GoRA's float32 sums,
    1/world of the target weights, and one block's gradient."""
    bound = sizes["model_bytes"] / world + sizes["block_bytes"]
    if phase in ("gradient steps", "init"):
        bound += sizes["target_bytes"] / world + sizes["block_bytes"]
    return int(bound)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", default=["zero3", "fsdp2"], choices=["zero3", "fsdp2"])
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--quick", action="store_true", help="a ~10 M model instead of ~0.5 B (checks the script runs)")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="gora_memory_")
    big, tiny = os.path.join(work, "model"), os.path.join(work, "tiny")
    sizes = save_random_llama(big, QUICK if args.quick else BIG)
    save_random_llama(tiny, TINY)
    data = os.path.join(work, "sums.jsonl")
    write_data(data)
    print(f"model: {sizes['parameters'] / 1e6:.1f} M parameters, {sizes['model_bytes'] / GIB:.2f} GiB float32; "
          f"one block {sizes['block_bytes'] / GIB:.3f} GiB", flush=True)
    runs = []
    for engine in args.engines:
        for world in args.worlds:
            row = {"engine": engine, "world": world, "phases": {}}
            for label, model in (("runtime", tiny), ("model", big)):
                trace = os.path.join(work, f"trace_{engine}_{world}_{label}")
                seconds = launch(engine, world, model, data, os.path.join(work, f"out_{engine}_{world}_{label}"),
                                 trace, args.timeout)
                row[f"{label}_seconds"] = round(seconds, 1)
                for phase, peak in largest_rank(trace, world).items():
                    row["phases"].setdefault(phase, {})[label] = peak
            for phase, entry in row["phases"].items():
                if "model" in entry and "runtime" in entry:
                    entry["model_dependent_rss"] = entry["model"]["rss"] - entry["runtime"]["rss"]
                    entry["model_dependent_heap"] = entry["model"]["heap"] - entry["runtime"]["heap"]
                    entry["bound"] = bound_bytes(phase, sizes, world)
            runs.append(row)
            print(_row_summary(row, sizes), flush=True)
    result = {"benchmark": "memory", "commit": git_commit(), "dirty": git_dirty("gora_dist", "benchmarks", "launch"),
              "date": time.strftime("%Y-%m-%d"), "versions": package_versions("torch", "deepspeed", "transformers"),
              "cpus": os.cpu_count(), "sizes": sizes, "quick": args.quick, "runs": runs,
              "method": "largest rank per phase; resident memory with MALLOC_MMAP_THRESHOLD_=131072 and mallinfo2 heap, "
                        "minus the same run with a 2-block hidden-32 model (the runtime)"}
    os.makedirs(args.output, exist_ok=True)
    stem = os.path.join(args.output, f"memory_{'quick_' if args.quick else ''}{_device()}")
    with open(stem + ".json", "w") as handle:
        json.dump(result, handle, indent=1)
    with open(stem + ".md", "w") as handle:
        handle.write(markdown(result))
    print(markdown(result))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _device() -> str:
    import torch

    return torch.cuda.get_device_name().replace(" ", "_").lower() if torch.cuda.is_available() else "cpu"


def _row_summary(row: dict, sizes: dict) -> str:
    cells = []
    for phase in PHASES:
        entry = row["phases"].get(phase)
        if entry and "model_dependent_rss" in entry:
            cells.append(f"{phase} {entry['model_dependent_heap'] / sizes['model_bytes']:.2f}x")
    return f"{row['engine']} world {row['world']}: " + ", ".join(cells)


def markdown(result: dict) -> str:
    sizes = result["sizes"]
    model = sizes["model_bytes"]
    lines = [f"# Peak memory per phase ({sizes['parameters'] / 1e6:.0f} M-parameter random Llama, float32, "
             f"{model / GIB:.2f} GiB)", "",
             f"commit {result.get('commit', '?')}, {result.get('date', '?')}; {result['method']}.", "",
             "Model-dependent peak of the largest rank as a multiple of the model's bytes: glibc's in-use heap "
             "(allocated, touched or not: what a GPU allocator would hold), resident memory in brackets (touched "
             "pages, including the checkpoint file's pages mapped while loading), and the goal: model/world + one "
             "block; in the gradient steps and init also GoRA's float32 sums (targets/world) + one block's gradient. "
             "✗: heap above the goal. Runtime: the tiny model's peak heap and resident memory in GiB.", "",
             "| engine | world | " + " | ".join(PHASES) + " | runtime (GiB) |",
             "|---|---|" + "---|" * len(PHASES) + "---|"]
    for row in result["runs"]:
        cells = []
        for phase in PHASES:
            entry = row["phases"].get(phase)
            if not entry or "model_dependent_rss" not in entry:
                cells.append("–")
                continue
            heap, rss, goal = (entry["model_dependent_heap"] / model, entry["model_dependent_rss"] / model,
                               entry["bound"] / model)
            mark = "" if entry["model_dependent_heap"] <= entry["bound"] else " ✗"
            cells.append(f"{heap:.2f} ({rss:.2f}) ≤ {goal:.2f}{mark}")
        heap = max(entry.get("runtime", {}).get("heap", 0) for entry in row["phases"].values()) / GIB
        rss = max(entry.get("runtime", {}).get("rss", 0) for entry in row["phases"].values()) / GIB
        lines.append(f"| {row['engine']} | {row['world']} | " + " | ".join(cells) + f" | {heap:.2f} ({rss:.2f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
