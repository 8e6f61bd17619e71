#!/usr/bin/env python
"""GoRA in an accelerate training loop (the pattern to copy into your own script).

    accelerate launch --cpu launch/accelerate_example.py --model tiny-llama --data reviews.jsonl   # one process
    accelerate launch --multi_gpu --num_processes 8 launch/accelerate_example.py
    accelerate launch --config_file my_fsdp_or_deepspeed.yaml launch/accelerate_example.py

GoRA runs before ``accelerator.prepare``: ``prepare_gora`` estimates the plan on this rank's share
of the global batches (DDP-style when several processes run; ZeRO-3-sharded when the model was
loaded partitioned under ``deepspeed.zero.Init``) and puts the adapters in; accelerate then wraps
the model and the optimizer sees only the adapters.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from gora_dist import GoRAConfig  # noqa: E402
from gora_dist.integrations import gather_adapters, prepare_gora  # noqa: E402
from gora_dist.launcher.data import split_examples  # noqa: E402
from gora_dist.launcher.tasks.classification import load_examples, model_and_encoder  # noqa: E402
from gora_dist.report import GoRAPlan  # noqa: E402
from gora_dist.model.adapter_io import save_plan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="movie-sentiment")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output-dir", default="runs/accelerate-gora")
    options = parser.parse_args()

    accelerator = Accelerator()
    model, encoder = model_and_encoder(options.model, precision="fp32", max_length=64)
    examples, _ = load_examples(options.data)
    train, _ = split_examples(examples, 2000, 200)
    collate = encoder.batch  # list of (text, label) -> model inputs

    config = GoRAConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], grad_steps=4)
    plan = prepare_gora(model, train, config, global_batch_size=options.global_batch_size, data_collator=collate)
    accelerator.print(plan.report.table())

    per_rank = options.global_batch_size // accelerator.num_processes
    loader = torch.utils.data.DataLoader(train, batch_size=per_rank, shuffle=True, collate_fn=collate, drop_last=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    for step, batch in zip(range(options.steps), loader):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0:
            accelerator.print(f"step {step}: loss {accelerator.gather(loss.detach()).mean():.4f}")

    adapters = gather_adapters(accelerator.unwrap_model(model))
    if accelerator.is_main_process:
        final = GoRAPlan(plan.report, {n: a for n, (a, _) in adapters.items()}, {n: b for n, (_, b) in adapters.items()})
        save_plan(final, os.path.join(options.output_dir, "adapter"), accelerator.unwrap_model(model))
        accelerator.print(f"adapter in {options.output_dir}/adapter")
    accelerator.end_training()


if __name__ == "__main__":
    main()
