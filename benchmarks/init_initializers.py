#!/usr/bin/env python
"""Init cost of each initializer (GoRA, LoRA-GA, LoRA-One, PiSSA) from our sharded estimator at
world 1/2/4, beside PEFT's own single-process LoRA-GA and PiSSA on the same model, in one run; and
what PEFT's LoRA-GA and PiSSA do under ZeRO-3 at world 2.

    python benchmarks/init_initializers.py            # the "base" Llama of init_overhead.py, worlds 1 2 4
    python benchmarks/init_initializers.py --quick    # tiny model, worlds 1 2

Ours: ``estimate_plan`` with ``allocator="uniform"`` (r = 8 on the seven projections, PEFT's ranks),
N gradient steps of a global batch, ``local`` at world 1 and ZeRO-3 (DeepSpeed on the CPU, gloo) above;
per initializer the slowest rank's seconds of the gradient steps and of everything after them (the
SVDs, A0/B0, agreement), the bytes GoRA handed to collectives per rank, and the process's peak RSS
(reset before each initializer). PEFT: ``get_peft_model`` with ``init_lora_weights="pissa"`` (exact
SVD), ``"pissa_niter_4"`` and LoRA-GA (``preprocess_loraga`` on the same N batches, then
``get_peft_model``), one process. PEFT under ZeRO-3: the model loaded partitioned
(``deepspeed.zero.Init``), then the same calls on each of 2 ranks; what happens is recorded as it is.
Results: benchmarks/results/init_initializers_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from init_overhead import (STEPS, TARGETS, build_model, peak_rss_mb, rank_batches, reset_peak_rss,  # noqa: E402
                           slowest)
from provenance import git_commit, package_versions  # noqa: E402

INITIALIZERS = ("gora", "lora_ga", "lora_one", "pissa")
RANK = 8
DS_CONFIG = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": False}, "train_micro_batch_size_per_gpu": 1,
             "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True}


def world_and_rank():
    import torch.distributed as dist

    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def ours(size: str) -> dict:
    """Every initializer through estimate_plan on this rank's share of the batches."""
    from gora_dist import GoRAConfig, estimate_plan

    world, rank = world_and_rank()
    rows = {}
    for initializer in INITIALIZERS:
        gc.collect()
        reset_peak_rss()
        model = build_model(size)
        config = GoRAConfig(target_modules=TARGETS, grad_steps=STEPS, allocator="uniform", rank_ref=RANK,
                            initializer=initializer)
        engine = {"engine": "local"} if world == 1 else {"engine": "zero3", "ds_config": DS_CONFIG}
        plan = estimate_plan(model, rank_batches(rank, world, STEPS, seed=1), config, **engine)
        timings = plan.report.timings
        rows[initializer] = {"gradient_s": slowest(timings["gradient_s"]), "after_s": slowest(timings["init_s"]),
                             "bytes": timings["bytes_communicated"], "peak_rss_mb": slowest(peak_rss_mb()),
                             "layers": len(plan.rank_map)}
        del model, plan
    return rows


def peft_calls(size: str, model_factory, train_step_for):
    """PEFT's PiSSA (exact, niter 4) and LoRA-GA on a fresh model each; {name: outcome}."""
    import peft
    from peft.tuners.lora.loraga import preprocess_loraga

    outcomes = {}
    for name, init in (("PEFT PiSSA (exact SVD)", "pissa"), ("PEFT PiSSA (niter 4)", "pissa_niter_4"),
                       ("PEFT LoRA-GA", "lora_ga")):
        gc.collect()
        reset_peak_rss()
        model = model_factory()
        before = target_weights(model)
        config = peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=TARGETS, init_lora_weights=init,
                                 use_rslora=True,
                                 lora_ga_config=peft.LoraGAConfig() if init == "lora_ga" else None)
        start = time.perf_counter()
        try:
            if init == "lora_ga":
                preprocess_loraga(model, config, train_step_for(model))
            peft_model = peft.get_peft_model(model, config)
            outcomes[name] = {"ok": True, "seconds": slowest(time.perf_counter() - start),
                              "effective_error": effective_error(peft_model, before)}
        except Exception as error:  # noqa: BLE001 - the benchmark reports what happens
            outcomes[name] = {"ok": False, "seconds": time.perf_counter() - start,
                              "error": f"{type(error).__name__}: {error}"[:400],
                              "where": traceback.format_exc().strip().splitlines()[-3].strip()[:200]}
        outcomes[name]["peak_rss_mb"] = peak_rss_mb()
        del model
    return outcomes


def gathered(params):
    """A context in which ZeRO-3 partitioned ``params`` are whole (a collective); nothing otherwise."""
    import contextlib

    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


def target_weights(model) -> dict:
    """{layer: a float32 copy of its whole weight} of the target projections, before any init."""
    import torch

    found = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            with gathered([module.weight]), torch.no_grad():
                found[name] = module.weight.detach().float().clone()
    return found


def effective_error(peft_model, before: dict) -> float:
    """max |base + s·B·A − W| over the adapted layers (relative to max |W|, W as before the call): 0
    up to rounding where the initialisation left the model's function alone."""
    import torch

    worst = 0.0
    for name, module in peft_model.base_model.model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        params = [module.get_base_layer().weight, module.lora_A["default"].weight, module.lora_B["default"].weight]
        with gathered(params), torch.no_grad():
            effective = params[0].float() + module.scaling["default"] * params[2].float() @ params[1].float()
            weight = before[name]
            worst = max(worst, float((effective - weight).abs().max() / weight.abs().max()))
    return worst


def peft_local(size: str) -> dict:
    def train_step_for(model):
        def train_step():
            for batch in rank_batches(0, 1, STEPS, seed=1):
                model(**batch).loss.backward()
        return train_step

    return peft_calls(size, lambda: build_model(size), train_step_for)


def peft_zero3(size: str) -> dict:
    """PEFT's own calls on a model loaded partitioned under ZeRO-3 (as from_pretrained does with a
    stage-3 config); LoRA-GA's gradient steps through the DeepSpeed engine, as a ZeRO-3 run takes them."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    world, rank = world_and_rank()
    keep = HfDeepSpeedConfig(DS_CONFIG)  # noqa: F841 - transformers reads it while it lives

    def partitioned():
        with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
            return build_model(size)

    def train_step_for(model):
        def train_step():
            import torch

            trainable = [p for p in model.parameters() if p.requires_grad]  # the target weights, set by PEFT
            engine, *_ = deepspeed.initialize(model=model, config=DS_CONFIG, model_parameters=trainable,
                                              optimizer=torch.optim.SGD(trainable, lr=0.0))  # backward needs one
            for batch in rank_batches(rank, world, STEPS, seed=1):
                engine.backward(engine(**batch).loss)
        return train_step

    return peft_calls(size, partitioned, train_step_for)


def worker(size: str, mode: str, out: str) -> None:
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    warm = build_model(size)  # a process's first backward pays thread-pool and allocator start-up
    for batch in rank_batches(0, 1, 1, seed=3):
        warm(**batch).loss.backward()
    row = {"params": sum(p.numel() for p in warm.parameters())}
    del warm
    row["results"] = {"ours": ours, "peft": peft_local, "peft_zero3": peft_zero3}[mode](size)
    world, rank = world_and_rank()
    row["world"] = world
    if mode == "peft_zero3":  # every rank's outcome: what happened may differ by rank
        gathered = [None] * world
        dist.all_gather_object(gathered, row["results"])
        row["results"] = gathered
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(row, handle)
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # gloo can abort in interpreter finalisation


def launch(size: str, mode: str, world: int, out: str) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)))
    if world == 1:
        command = [sys.executable, os.path.abspath(__file__), "--worker", size, mode, out]
    else:
        command = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(world), "--master_port", "29731",
                   os.path.abspath(__file__), "--worker", size, mode, out]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0 or not os.path.isfile(out):
        return {"failed": True, "returncode": result.returncode, "tail": (result.stdout + result.stderr)[-1500:],
                "wall_s": time.perf_counter() - started}
    with open(out) as handle:
        row = json.load(handle)
    os.remove(out)
    return row


def markdown(meta: dict, cells: dict) -> str:
    lines = [f"# Init cost by initializer, sharded, beside PEFT ({meta['date']}, commit {meta['commit']})", "",
             f"{meta['machine']}; {meta['versions']}; model `{meta['size']}` ({meta['params'] / 1e6:.1f} M parameters, "
             f"the seven projections of every block at r = {RANK}); N = {STEPS} gradient steps of a global batch of 8 x 64 "
             "tokens. Times are the slowest rank's, after one warm-up backward per process; world 4 runs 4 processes "
             f"on {os.cpu_count()} cores (oversubscribed). Command: `{meta['command']}`.", "",
             "| initializer | world | engine | N grad steps s | after s | total s | bytes / rank | peak RSS / rank | total vs PEFT's one process |",
             "|---|---|---|---|---|---|---|---|---|"]
    peft_total = {}
    local = cells.get("peft", {}).get("results", {})
    peft_total["pissa"] = local.get("PEFT PiSSA (exact SVD)", {}).get("seconds")
    peft_total["lora_ga"] = local.get("PEFT LoRA-GA", {}).get("seconds")
    for initializer in INITIALIZERS:
        for key, cell in sorted((k, v) for k, v in cells.items() if k.startswith("ours-")):
            if cell.get("failed"):
                continue
            world = cell["world"]
            row = cell["results"][initializer]
            total = row["gradient_s"] + row["after_s"]
            reference = peft_total.get(initializer)
            ratio = f"{total / reference:.2f}x" if reference else "—"
            lines.append(f"| {initializer} | {world} | {'local' if world == 1 else 'zero3'} | {row['gradient_s']:.2f} | "
                         f"{row['after_s']:.3f} | {total:.2f} | {row['bytes'] / 1e6:.3f} MB | {row['peak_rss_mb']:.0f} MB | {ratio} |")
    lines += ["", "PEFT's own initialisations (one process, then ZeRO-3 at world 2, each rank):", "",
              "| call | where | ok | seconds | peak RSS | what happened |", "|---|---|---|---|---|---|"]
    def happened(outcome):
        if not outcome["ok"]:
            return outcome["error"] + (f" (at {outcome['where']})" if "where" in outcome else "")
        return f"initialised; max abs(base + s·B·A − W) / max abs(W) = {outcome['effective_error']:.1e}"

    for name, outcome in local.items():
        lines.append(f"| {name} | one process | {outcome['ok']} | {outcome['seconds']:.2f} | {outcome['peak_rss_mb']:.0f} MB | "
                     f"{happened(outcome)} |")
    zero3 = cells.get("peft_zero3", {})
    if zero3.get("failed"):
        lines.append(f"| all | ZeRO-3 world 2 | False | — | — | the launch failed (rc {zero3['returncode']}): "
                     f"{zero3['tail'][-300:]!r} |")
    for rank, outcomes in enumerate(zero3.get("results", [])):
        for name, outcome in outcomes.items():
            said = happened(outcome)
            lines.append(f"| {name} | ZeRO-3 world 2, rank {rank} | {outcome['ok']} | {outcome['seconds']:.2f} | "
                         f"{outcome['peak_rss_mb']:.0f} MB | {said.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("SIZE", "MODE", "OUT"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # the deepspeed launcher's
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    options = parser.parse_args()
    if options.worker:
        worker(*options.worker)
        return
    size, worlds = ("tiny", [1, 2]) if options.quick else ("base", [1, 2, 4])
    os.makedirs(options.results, exist_ok=True)
    cells = {}
    for world in worlds:
        cells[f"ours-{world}"] = launch(size, "ours", world, os.path.join(options.results, f".ours-{world}.json"))
        print(f"ours at world {world}: {'failed' if cells[f'ours-{world}'].get('failed') else 'done'}", flush=True)
    cells["peft"] = launch(size, "peft", 1, os.path.join(options.results, ".peft.json"))
    cells["peft_zero3"] = launch(size, "peft_zero3", 2, os.path.join(options.results, ".peft_zero3.json"))
    params = next((c["params"] for c in cells.values() if "params" in c), 0)
    meta = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, CPU, gloo",
            "versions": ", ".join(f"{k} {v}" for k, v in package_versions("torch", "peft", "deepspeed").items()),
            "commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "size": size,
            "params": params, "command": "python benchmarks/init_initializers.py" + (" --quick" if options.quick else "")}
    tag = "init_initializers_cpu" + ("_quick" if options.quick else "")
    with open(os.path.join(options.results, f"{tag}.json"), "w") as handle:
        json.dump({"meta": meta, "cells": cells}, handle, indent=2)
    text = markdown(meta, cells)
    with open(os.path.join(options.results, f"{tag}.md"), "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
