#!/usr/bin/env python
"""Peak memory of one SFT training step: the model's own loss over full-vocabulary logits against
the launcher's loss with logits only at target positions (gora_dist/launcher/tasks/sft_loss.py).

    python benchmarks/loss_memory.py            # vocabulary 128,256, 4,096 tokens a step, float32, CPU

A random-weight Llama with Llama-3's vocabulary (hidden 256, 2 layers: the head and the logits are
most of the memory, as in a real SFT step), 8 examples of 512 tokens, the targets the last
``share`` of each example (0.25: an SFT response; 1.0: every token, as with train_on_prompt). Only
the q/v projections train, so the backward runs through the logits as LoRA's does. Each variant
runs in a fresh process with MALLOC_MMAP_THRESHOLD_=131072; a thread samples glibc's heap in use
(mallinfo2) every millisecond, and the step's peak is the largest sample minus the heap before the
step (model, batch and torch's runtime already there). Results: benchmarks/results/loss_memory_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from provenance import git_commit, git_dirty, package_versions  # noqa: E402

VOCAB, EXAMPLES, LENGTH = 128_256, 8, 512


def one_step(variant: str, share: float) -> dict:
    """In this process: build the model and batch, then one forward + backward, heap sampled."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gora_dist.launcher.tasks.sft_loss import response_loss
    from gora_dist.memory_trace import _heap_reader

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).train()
    for name, param in model.named_parameters():
        param.requires_grad = name.endswith(("q_proj.weight", "v_proj.weight"))
    ids = torch.randint(0, VOCAB, (EXAMPLES, LENGTH))
    labels = torch.full_like(ids, -100)
    first = LENGTH - int(LENGTH * share)
    labels[:, first:] = ids[:, first:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "use_cache": False,
             "num_items_in_batch": int((labels[:, 1:] != -100).sum())}
    heap = _heap_reader()
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], heap())
            time.sleep(0.001)

    before = heap()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    loss = model(**batch).loss if variant == "full logits" else response_loss(model, batch)
    loss.backward()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return {"variant": variant, "share": share, "loss": float(loss), "step_peak_gb": (peak[0] - before) / 2**30,
            "heap_before_gb": before / 2**30, "step_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "SHARE"))
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(one_step(args.worker[0], float(args.worker[1]))))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(os.cpu_count() or 1))
    rows = []
    for share in (0.25, 1.0):
        for variant in ("full logits", "logits at targets"):
            done = subprocess.run([sys.executable, __file__, "--worker", variant, str(share)], env=env,
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
              "dirty": git_dirty("gora_dist", "benchmarks"), "versions": package_versions("torch", "transformers"),
              "vocab": VOCAB, "tokens": EXAMPLES * LENGTH, "rows": rows}
    os.makedirs(args.results, exist_ok=True)
    json.dump(result, open(os.path.join(args.results, "loss_memory_cpu.json"), "w"), indent=1)
    lines = [f"# Peak memory of one SFT step, full logits vs logits at targets ({result['date']}, commit "
             f"{result['commit']}{' + uncommitted changes' if result['dirty'] else ''})", "",
             f"`python benchmarks/loss_memory.py`: random Llama, vocabulary {VOCAB:,}, {EXAMPLES} x {LENGTH} = "
             f"{EXAMPLES * LENGTH:,} tokens, float32, CPU; the step's peak of glibc's heap above the heap before it.", "",
             "| targets | loss | step peak GB | vs full logits | loss value | step s |", "|---|---|---|---|---|---|"]
    for share in (0.25, 1.0):
        full, kept = (next(r for r in rows if r["share"] == share and r["variant"] == v)
                      for v in ("full logits", "logits at targets"))
        for row in (full, kept):
            change = "" if row is full else f"{row['step_peak_gb'] / full['step_peak_gb'] - 1:+.1%}"
            lines.append(f"| {share:.0%} of tokens | {row['variant']} | {row['step_peak_gb']:.2f} | {change} | "
                         f"{row['loss']:.7f} | {row['step_s']:.1f} |")
        lines.append(f"| | relative loss difference | | | {abs(kept['loss'] - full['loss']) / full['loss']:.1e} | |")
    with open(os.path.join(args.results, "loss_memory_cpu.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
