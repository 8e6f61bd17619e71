#!/usr/bin/env python
"""Fine-tune a causal LM with GoRA: gradient estimation → rank map → init → training → adapters.

With no arguments it runs the embedded job on the CPU in a few minutes: SmolLM2-135M-Instruct
(packaged GGUF) learns movie-review sentiment (packaged data) as next-token prediction.

    python launch/train.py                                   # one process, embedded default
    python launch/train.py --task sft --data asdiv            # ASDiv math word problems, scored by generation
    python launch/train.py --task sft --data my.jsonl --model path/to/hf-folder   # prompt/completion or messages
    torchrun --nproc_per_node 8 launch/train.py --task sft --data my.jsonl --model path/to/hf-folder --engine fsdp2
    deepspeed --num_gpus 8 launch/train.py --task sft --data my.parquet --model path/to/hf-folder
    python launch/train.py my.yaml --steps 200 --gora.rank_max 64
    torchrun --nproc_per_node 8 launch/train.py --engine fsdp2 [--engine ddp]
    deepspeed --num_gpus 8 launch/train.py                    # ZeRO-3 (engine auto under deepspeed)
    deepspeed --num_gpus 8 launch/train.py --engine zero2 --checkpoint-every 0   # no ZeRO-2 checkpoints yet
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/train.py # CPU, gloo
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29400 launch/train.py --engine fsdp2
    deepspeed --hostfile hosts.txt launch/train.py
    python launch/train.py --init-only --output-dir out/      # stop after init, save the adapter
    python launch/train.py --resume --output-dir out/         # continue from out/checkpoints/latest
    python launch/train.py --task sft --data asdiv --epochs 2 --report-to tensorboard   # 2 passes; TensorBoard too
    python launch/train.py --help                             # every option with its docstring

Every option: --help, or gora_dist/launcher/config.py (TrainConfig; GoRA's as --gora.<field>).
Each step is a line of OUT/train_log.jsonl (loss, lr, grad_norm, step_s, tokens, tokens/s, peak memory).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too

from gora_dist.launcher.cli import cli  # noqa: E402

if __name__ == "__main__":
    code = cli()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without interpreter finalisation. A gloo worker thread that still holds a finished
    # all-gather (kept alive by references the engines hold to their process groups) decrefs its
    # tensors while Python finalises; taking the GIL then ends the thread with a forced unwind
    # through C++ and std::terminate (gdb: ProcessGroupGloo::runLoop -> ~AsyncAllgatherWork ->
    # PyThread_exit_thread). Seen in about one 2-process run in five with torch 2.13 on the CPU,
    # always after all work was written and the process group destroyed.
    os._exit(code)
