"""The GPU suite's result files: <out>/gpu_<device>.json (the whole record) and .md (its tables),
rewritten after every step so a run cut off still leaves what it measured. Apart from gpu_suite.py
so the steps and the budget read alone; standard library only, like the suite on a bare machine."""

from __future__ import annotations

import json
import os


def device_slug(environment: dict, dry_run: bool) -> str:
    """The file name's device part: the GPU's name in lower case (one file per kind of machine)."""
    if dry_run:
        return "dry_run"
    name = environment.get("gpu") or "no_gpu"
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def _f(value, digits=2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(record: dict) -> str:
    """The record's page: each step's status, then the figures of the steps that returned them."""
    env = (record["steps"].get("environment", {}).get("result") or {})
    title = "DRY RUN on the CPU, NOT A MEASUREMENT: " if record["dry_run"] else ""
    lines = [f"# {title}GPU suite on {env.get('gpu', 'no GPU')} ({record['date']}, commit {record['commit']})", "",
             f"Command: `{record['command']}`; budget {record['budget_s']:.0f} s, used {record['used_s']:.0f} s. "
             f"Python {env.get('python')}, packages {env.get('packages')}, CUDA {env.get('torch_cuda')}, driver "
             f"{env.get('driver')}.", "",
             "| step | status | wall s |", "|---|---|---|"]
    for name, entry in record["steps"].items():
        lines.append(f"| {name} | {entry['status']} | {entry['wall_s']:.1f} |")
    if env:
        lines += ["", f"Ceilings: device-to-device copy {_f(env.get('copy_gbps'), 0)} GB/s (read + written, "
                  f"{env.get('copy_bytes', 0) / 2**30:.2f} GiB buffers); bf16 matmul {env.get('matmul_size')}³ "
                  f"{_f(env.get('matmul_tflops'), 1)} TFLOP/s."]
    tests = record["steps"].get("gpu_tests", {}).get("result")
    if tests:
        lines += ["", f"GPU tests: {tests['summary']} (log: {tests['log']})."]
    kernels = record["steps"].get("kernels", {}).get("result")
    if kernels and kernels.get("layers"):
        by_key = {}
        for row in kernels["layers"]:
            by_key.setdefault((row["kind"], row["rank"], row["tokens"]), {})[row["impl"]] = row
        lines += ["", "Layer, full step (forward + backward), median ms:", "",
                  "| shape | rank | tokens | base | torch | peft | fused | fused/base | peft/fused |", "|" + "---|" * 9]
        for (kind, rank, tokens), impls in by_key.items():
            ms = {impl: impls[impl]["full_ms"][0] for impl in impls}
            lines.append(f"| {kind} | {rank} | {tokens} | " + " | ".join(_f(ms.get(i), 3) for i in
                         ("base", "torch", "peft", "fused")) + f" | {ms['fused'] / ms['base']:.3f} | "
                         f"{ms['peft'] / ms['fused']:.3f} |")
        if kernels.get("init"):
            lines += ["", "B0 for all layers: " + "; ".join(f"{row['impl']} {row['total_ms'][0]:.1f} ms"
                                                           for row in kernels["init"]) + "."]
    init = [record["steps"].get(f"init_kernels_{s}", {}).get("result") for s in ("on", "off")]
    if any(init):
        lines += ["", "GoRA init, one device (gradient steps, then everything after them):", "",
                  "| kernels | model params | grad steps × tokens | gradient s | after s | after / gradient | "
                  "peak GiB gradient steps | peak GiB init |", "|---|---|---|---|---|---|---|---|"]
        for row in filter(None, init):
            lines.append(f"| {'on' if row['kernels'] else 'off'} | {row['parameters'] / 1e6:,.1f} M | "
                         f"{row['grad_steps']} × {row['tokens_per_step']} | {_f(row['gradient_s'])} | "
                         f"{_f(row['after_gradients_s'], 3)} | {100 * row['after_over_gradient']:.2f} % | "
                         f"{_f(row.get('peak_gib_gradient_steps'))} | {_f(row.get('peak_gib_init'))} |")
    sft = [record["steps"].get(f"sft_kernels_{s}", {}).get("result") for s in ("on", "off")]
    if any(sft):
        lines += ["", "SFT training steps after the init:", "",
                  "| kernels | steps × tokens | s / step | tokens / s | model TFLOP/s | MFU | peak GiB | losses finite |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in filter(None, sft):
            mfu = f"{100 * row['mfu']:.1f} %" if row.get("mfu") is not None else "—"
            lines.append(f"| {'on' if row['kernels'] else 'off'} | {row['steps']} × {row['tokens_per_step']} | "
                         f"{_f(row['s_per_step'], 3)} | {row['tokens_per_s']:,.0f} | {_f(row.get('model_tflops_per_s'), 3)} | "
                         f"{mfu} | {_f(row['peak_gib'])} | {row['finite']} |")
    trainer = record["steps"].get("trainer_fsdp2", {}).get("result")
    if trainer:
        lines += ["", f"Trainer asked for FSDP2 on {trainer['device']}, GoRA's engine {trainer['engine']} (one rank): "
                  "accelerate's FSDP "
                  f"plugin {'on' if trainer['fsdp_plugin'] else 'off'}, weights sharded {trainer['sharded_weights']}; "
                  f"rank map equal to one process's {trainer['rank_map_equal']}, adapters within "
                  f"{trainer['max_adapter_gap']:.1e}; loss {trainer['first_loss']:.3f} → {trainer['last_loss']:.3f}; base "
                  f"unchanged {trainer['base_unchanged']}; saved adapter loads in PEFT ({trainer['peft_loaded_layers']} "
                  f"layers); checks {'pass' if trainer['ok'] else 'FAIL'} (log: trainer_fsdp2.log)."]
    svd = record["steps"].get("sharded_svd", {}).get("result")
    if svd:
        lines += ["", "Sharded randomized SVD (GoRAConfig's oversampling and power iterations) per target shape, beside one device's "
                  "exact SVD and svd_lowrank; one rank of 8 = that rank's compute on its ZeRO-3 slice, traffic not "
                  "included:", "",
                  "| shape | rank | ours s | one rank of 8 s | exact s | svd_lowrank s | max rel. error σ | "
                  "bytes sent / rank |", "|" + "---|" * 8]
        for row in svd["rows"]:
            lines.append(f"| {row['shape'][0]}×{row['shape'][1]} | {row['rank']} | {row['ours_s']:.4f} | "
                         f"{row['ours_one_rank_of_8_s']:.4f} | {row['exact_s']:.4f} | {row['svd_lowrank_s']:.4f} | "
                         f"{row['max_rel_error']:.1e} | {row['traffic_bytes_per_rank'] / 1e6:.2f} MB |")
        lines += ["", "Whole model: " + "; ".join(
            f"rank {rank}: ours {t['ours_s']:.2f} s, exact {t['exact_s']:.2f} s, svd_lowrank {t['svd_lowrank_s']:.2f} s "
            f"over {t['layers']} layers" for rank, t in svd["whole_model"].items()) + "."]
    failed = {n: e for n, e in record["steps"].items() if e["status"] != "ok"}
    for name, entry in failed.items():
        lines += ["", f"{name}: {entry['status']}; output's tail:", "", "```", entry.get("output_tail", "").strip(), "```"]
    return "\n".join(lines) + "\n"


def write(record: dict, out: str) -> str:
    """Write the record's .json and .md under ``out``; their common path, without the suffix."""
    env = record["steps"].get("environment", {}).get("result") or {}
    stem = os.path.join(out, f"gpu_{device_slug(env, record['dry_run'])}")
    with open(stem + ".json", "w") as handle:
        json.dump(record, handle, indent=1)
    with open(stem + ".md", "w") as handle:
        handle.write(markdown(record))
    return stem
