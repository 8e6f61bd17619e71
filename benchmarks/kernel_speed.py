#!/usr/bin/env python
"""Fused Triton LoRA layer and pinv init against the alternatives, on one CUDA GPU.

    python benchmarks/kernel_speed.py            # full run: needs CUDA, writes benchmarks/results/kernels_<gpu>.{json,md}
    python benchmarks/kernel_speed.py --quick    # 2 token counts, one rank per shape
    python benchmarks/kernel_speed.py --dry-run  # no GPU: tiny shapes under TRITON_INTERPRET=1, wall-clock timer,
                                                 # writes to a temporary folder; proves the script runs, measures nothing

Layer benchmark: bf16 layers of Llama-3.1-8B (q/o 4096→4096, k/v 4096→1024, gate/up 4096→14336,
down 14336→4096), 2k-16k tokens, float32 adapters, ranks from a GoRA rank map over the 8B model's
224 target layers (``rank_map``), for four implementations:
  base   the frozen base linear alone (F.linear; backward = dX only),
  torch  ``lora_linear_reference`` (what GoRALinear's torch path computes),
  peft   ``peft.tuners.lora.Linear`` (adapters cast to float32, PEFT's default for bf16 bases),
  fused  ``gora_dist.kernels.lora_linear`` (Triton),
and three modes: forward, backward (of a retained graph), full (forward + backward). Plus grouped
q/k/v (one shrink for three adapters) against three separate fused calls.
Init benchmark: B0 for all 224 layers of the 8B model from float32 Ḡ: the fused kernel (with the
float64 Cholesky inverse per layer), plan.py's torch path (float32 C, float64 Cholesky solve), and
the official code's way (``torch.linalg.pinv`` per layer). All three start from the same state, Ḡ and
A0 already on the GPU (moved there outside the timed region), and each timed call includes its
per-layer factorisation of A0 on the GPU (float64 Cholesky for fused and plan_torch, the SVD inside
``pinv`` for the loop). One Ḡ per projection kind is allocated
and reused by its 32 layers (the 28 GB of a full set would not be needed to time the reads: every Ḡ
is far larger than L2).
Timings: ``triton.testing.do_bench`` quantiles (median, 20%, 80%) in milliseconds.

The rank map is synthetic: ``allocate_ranks`` (GoRA's rule, rank_ref 8, rank_min 4, rank_max 32,
sqrt features) over the 8B shapes, from log-normal importances (seed 0). No 8B gradient estimate has
been run on this project's machines; the benchmark needs a realistic spread of ranks, not the exact
ones of a particular run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # provenance.py, beside this file

from provenance import git_commit, git_dirty, package_versions  # noqa: E402

HIDDEN, INTERMEDIATE, KV, LAYERS = 4096, 14336, 1024, 32
PROJECTIONS = {  # name: (out, in), Llama-3.1-8B
    "q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (INTERMEDIATE, HIDDEN), "up_proj": (INTERMEDIATE, HIDDEN), "down_proj": (HIDDEN, INTERMEDIATE),
}
SHAPE_OF_KIND = {"q/o": "q_proj", "k/v": "k_proj", "gate/up": "gate_proj", "down": "down_proj"}
TOKENS = [2048, 4096, 8192, 16384]
IMPLEMENTATIONS = ["base", "torch", "peft", "fused"]
MODES = ["forward", "backward", "full"]
QUANTILES = [0.5, 0.2, 0.8]
ALPHA = 16.0
DRY_RUN_SHAPES = {"q/o": (48, 48), "k/v": (24, 48)}


def rank_map(layers: int = LAYERS) -> dict:
    """{"model.layers.<i>.<proj>": rank}: GoRA's allocation over the 8B shapes, synthetic importances."""
    import torch

    from gora_dist.method.allocation import allocate_ranks

    names = [f"model.layers.{i}.{p}" for i in range(layers) for p in PROJECTIONS]
    shapes = {name: PROJECTIONS[name.rsplit(".", 1)[1]] for name in names}
    generator = torch.Generator().manual_seed(0)
    importance = torch.randn(len(names), generator=generator, dtype=torch.float64).mul(0.6).exp()
    advantage = {name: float(v) for name, v in zip(names, importance / importance.sum())}
    return allocate_ranks(advantage, shapes, rank_ref=8, rank_min=4, rank_max=32)


def ranks_per_kind(ranks: dict, quick: bool) -> dict:
    """{kind: [ranks to time]}: the min, median and max rank of that kind in the map (median only if quick)."""
    chosen = {}
    for kind, projection in SHAPE_OF_KIND.items():
        kinds = [p for p in PROJECTIONS if PROJECTIONS[p] == PROJECTIONS[projection]]
        values = sorted(r for name, r in ranks.items() if name.rsplit(".", 1)[1] in kinds)
        median = values[len(values) // 2]
        chosen[kind] = [median] if quick else sorted({values[0], median, values[-1]})
    return chosen


# --- timing ------------------------------------------------------------------------------------------------

def make_timer(dry_run: bool, rep_ms: int = 100):
    """(fn -> [median, p20, p80] ms): do_bench on a GPU (``rep_ms`` of repetitions); a plain
    wall-clock loop for --dry-run."""
    if not dry_run:
        from triton.testing import do_bench

        return lambda fn: list(do_bench(fn, warmup=25, rep=rep_ms, quantiles=QUANTILES))

    def wall_clock(fn, repeats: int = 3):
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        samples.sort()
        return [samples[len(samples) // 2], samples[0], samples[-1]]

    return wall_clock


def layer_case(impl: str, out_features: int, in_features: int, rank: int, tokens: int, device: str, dtype):
    """(forward fn, inputs whose grads are reset) for one implementation at one shape."""
    import torch
    import torch.nn.functional as F
    from gora_dist.kernels import lora_linear, lora_linear_reference

    generator = torch.Generator(device="cpu").manual_seed(rank)
    weight = (torch.randn(out_features, in_features, generator=generator) * in_features ** -0.5).to(device, dtype)
    bias = None
    lora_a = (torch.randn(rank, in_features, generator=generator) * in_features ** -0.5).to(device).requires_grad_()
    lora_b = (torch.randn(out_features, rank, generator=generator) * 0.01).to(device).requires_grad_()
    x = torch.randn(tokens, in_features, generator=generator).to(device, dtype).requires_grad_()
    scaling = ALPHA / math.sqrt(rank)
    if impl == "base":
        return (lambda: F.linear(x, weight, bias)), [x]
    if impl == "torch":
        return (lambda: lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling)), [x, lora_a, lora_b]
    if impl == "fused":
        return (lambda: lora_linear(x, weight, bias, lora_a, lora_b, scaling)), [x, lora_a, lora_b]
    if impl == "peft":
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear

        base = torch.nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
        base.weight.data.copy_(weight)
        base.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=ALPHA, use_rslora=True)
        layer = PeftLinear(base, "default", config=config, r=rank, lora_alpha=ALPHA, use_rslora=True)
        layer.lora_A["default"].float().weight.data.copy_(lora_a.detach())
        layer.lora_B["default"].float().weight.data.copy_(lora_b.detach())
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        return (lambda: layer(x)), [x, *params]
    raise ValueError(f"unknown implementation {impl!r}; one of {IMPLEMENTATIONS}")


def time_modes(forward, inputs, timer) -> dict:
    import torch

    def reset():
        for tensor in inputs:
            tensor.grad = None

    out = forward()
    grad_out = torch.randn_like(out)

    def backward():
        reset()
        out.backward(grad_out, retain_graph=True)

    def full():
        reset()
        forward().backward(grad_out)

    with torch.no_grad():
        forward_ms = timer(forward)
    return {"forward": forward_ms, "backward": timer(backward), "full": timer(full)}


def layer_rows(ranks: dict, tokens_list, shapes: dict, device: str, timer) -> list:
    import torch

    rows = []
    for kind, (out_features, in_features) in shapes.items():
        for rank in ranks[kind]:
            for tokens in tokens_list:
                for impl in IMPLEMENTATIONS:
                    forward, inputs = layer_case(impl, out_features, in_features, rank, tokens, device, torch.bfloat16)
                    timings = time_modes(forward, inputs, timer)
                    rows.append({"kind": kind, "out": out_features, "in": in_features, "rank": rank, "tokens": tokens,
                                 "impl": impl, **{f"{m}_ms": timings[m] for m in MODES}})
                    print(f"{kind:8s} r={rank:2d} tokens={tokens:5d} {impl:5s} "
                          + " ".join(f"{m}={timings[m][0]:.3f}" for m in MODES), flush=True)
    return rows


def qkv_calls(tokens: int, outs, in_features: int, qkv_ranks, device: str):
    """(grouped, separate): fwd+bwd of q/k/v through one grouped call, or three fused calls."""
    import torch
    from gora_dist.kernels import grouped_lora_linear, lora_linear

    x = torch.randn(tokens, in_features, device=device, dtype=torch.bfloat16, requires_grad=True)
    weights = [torch.randn(n, in_features, device=device, dtype=torch.bfloat16) * in_features ** -0.5 for n in outs]
    lora_as = [(torch.randn(r, in_features, device=device) * in_features ** -0.5).requires_grad_() for r in qkv_ranks]
    lora_bs = [(torch.randn(n, r, device=device) * 0.01).requires_grad_() for n, r in zip(outs, qkv_ranks)]
    scalings = [ALPHA / math.sqrt(r) for r in qkv_ranks]
    inputs = [x, *lora_as, *lora_bs]

    def run(outputs):
        for tensor in inputs:
            tensor.grad = None
        ys = outputs()
        torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])

    def grouped():
        run(lambda: grouped_lora_linear(x, weights, [None] * 3, lora_as, lora_bs, scalings))

    def separate():
        run(lambda: [lora_linear(x, w, None, a, b, s) for w, a, b, s in zip(weights, lora_as, lora_bs, scalings)])

    return grouped, separate


def grouped_rows(ranks: dict, tokens_list, shapes: dict, device: str, timer) -> list:
    """q/k/v with their own ranks: one grouped call against three fused calls (full fwd+bwd)."""
    qo, kv = shapes["q/o"], shapes["k/v"]
    outs, in_features = [qo[0], kv[0], kv[0]], qo[1]
    qkv_ranks = [ranks["q/o"][-1], ranks["k/v"][0], ranks["k/v"][-1]]
    rows = []
    for tokens in tokens_list:
        grouped, separate = qkv_calls(tokens, outs, in_features, qkv_ranks, device)
        for impl, fn in (("grouped", grouped), ("separate", separate)):
            timing = timer(fn)
            rows.append({"kind": "q+k+v", "ranks": qkv_ranks, "tokens": tokens, "impl": impl, "full_ms": timing})
            print(f"q+k+v ranks={qkv_ranks} tokens={tokens:5d} {impl:8s} full={timing[0]:.3f}", flush=True)
    return rows


def init_rows(ranks: dict, device: str, timer, projections: dict, layers: int) -> list:
    """B0 for every layer: fused kernel vs plan.py's torch path vs a per-layer torch.linalg.pinv loop."""
    import torch
    from gora_dist.kernels.pinv_solve import gram_inverse, pinv_init_b_triton

    from gora_dist.method.initialization import b0_scale, gradient_times_a, gram_cholesky, kaiming_uniform_a, solve_b0

    generator = torch.Generator().manual_seed(1)
    grads = {p: torch.randn(*shape, generator=generator).to(device) for p, shape in projections.items()}
    names = [f"model.layers.{i}.{p}" for i in range(layers) for p in projections]
    lora_as = {n: kaiming_uniform_a(ranks[n], projections[n.rsplit(".", 1)[1]][1], seed=0, module_name=n) for n in names}
    lora_as_gpu = {n: a.to(device) for n, a in lora_as.items()}
    xis = {n: b0_scale(0.05, ALPHA / math.sqrt(ranks[n]), a.shape[1], ranks[n]) for n, a in lora_as.items()}

    def grad_of(name):
        return grads[name.rsplit(".", 1)[1]]

    # Same preparation for all three (A0 on the GPU, outside the timing); each call factorises A0A0ᵀ per
    # layer on the GPU: gram_inverse (float64 Cholesky, inverse cast to float32) for the kernel's epilogue.
    def fused():
        return [pinv_init_b_triton(grad_of(n), lora_as_gpu[n], xis[n], inverse=gram_inverse(lora_as_gpu[n]))
                for n in names]

    def plan_torch():
        return [solve_b0(gradient_times_a(grad_of(n), lora_as_gpu[n]), gram_cholesky(lora_as_gpu[n]), xis[n]) for n in names]

    def official_pinv():
        return [-xis[n] * (grad_of(n) @ torch.linalg.pinv(lora_as_gpu[n])) for n in names]

    rows = []
    for impl, fn in (("fused", fused), ("plan_torch", plan_torch), ("pinv_loop", official_pinv)):
        timing = timer(fn)
        rows.append({"impl": impl, "layers": len(names), "total_ms": timing})
        print(f"pinv init, {len(names)} layers: {impl:10s} {timing[0]:.2f} ms", flush=True)
    return rows


# --- results --------------------------------------------------------------------------------------------------

def environment(device: str) -> dict:
    import torch

    found = package_versions("torch", "triton", "peft", "transformers")
    commit, dirty = git_commit(), git_dirty("kernels", "benchmarks/kernel_speed.py")
    gpu = torch.cuda.get_device_name() if device == "cuda" else f"CPU under TRITON_INTERPRET ({platform.processor() or 'cpu'})"
    return {"gpu": gpu, "cuda": torch.version.cuda, "versions": found, "commit": commit, "kernels_dirty": dirty,
            "python": platform.python_version(), "date": datetime.now(UTC).isoformat(timespec="seconds")}


def markdown(meta: dict, layers: list, grouped: list, init: list) -> str:
    title = "DRY RUN, NOT A MEASUREMENT: " if meta["dry_run"] else ""
    timer = "wall clock around interpreted kernels" if meta["dry_run"] else "triton.testing.do_bench"
    lines = [f"# {title}Triton LoRA kernels on {meta['gpu']} ({meta['date']}, commit {meta['commit']})", "",
             (f"versions: {meta['versions']}, CUDA {meta['cuda']}. Median ms (20%-80%) from {timer}; "
              "ratios are median/median. bf16 layers, float32 adapters."), "",
             "| shape | rank | tokens | mode | base | torch | peft | fused | fused/base | peft/fused |", "|" + "---|" * 10]
    by_key = {}
    for row in layers:
        by_key.setdefault((row["kind"], row["rank"], row["tokens"]), {})[row["impl"]] = row
    for (kind, rank, tokens), impls in by_key.items():
        for mode in MODES:
            cells = {impl: impls[impl][f"{mode}_ms"] for impl in IMPLEMENTATIONS}
            lines.append(f"| {kind} | {rank} | {tokens} | {mode} | " + " | ".join(
                f"{cells[i][0]:.3f} ({cells[i][1]:.3f}-{cells[i][2]:.3f})" for i in IMPLEMENTATIONS)
                + f" | {cells['fused'][0] / cells['base'][0]:.3f} | {cells['peft'][0] / cells['fused'][0]:.3f} |")
    if grouped:
        lines += ["", "| q+k+v ranks | tokens | grouped full | separate full | separate/grouped |", "|---|---|---|---|---|"]
        pairs = {}
        for row in grouped:
            pairs.setdefault(row["tokens"], {})[row["impl"]] = row
        for tokens, pair in pairs.items():
            g, s = pair["grouped"]["full_ms"], pair["separate"]["full_ms"]
            lines.append(f"| {pair['grouped']['ranks']} | {tokens} | {g[0]:.3f} | {s[0]:.3f} | {s[0] / g[0]:.3f} |")
    if init:
        lines += ["", f"B0 for all {init[0]['layers']} layers:", "", "| implementation | total ms (20%-80%) |", "|---|---|"]
        lines += [f"| {row['impl']} | {row['total_ms'][0]:.2f} ({row['total_ms'][1]:.2f}-{row['total_ms'][2]:.2f}) |"
                  for row in init]
    return "\n".join(lines) + "\n"


def write_results(results_dir: str, meta: dict, layers: list, grouped: list, init: list, rank_counts: dict) -> str:
    os.makedirs(results_dir, exist_ok=True)
    slug = "dry_run" if meta["dry_run"] else "".join(c if c.isalnum() else "_" for c in meta["gpu"].lower()).strip("_")
    stem = os.path.join(results_dir, f"kernels_{slug}")
    with open(stem + ".json", "w") as handle:
        json.dump({"meta": meta, "rank_map_histogram": rank_counts, "layers": layers, "grouped": grouped, "init": init},
                  handle, indent=2)
    with open(stem + ".md", "w") as handle:
        handle.write(markdown(meta, layers, grouped, init))
    return stem


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tokens 2k and 8k, the median rank per shape")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: tiny shapes under the Triton interpreter")
    parser.add_argument("--skip-init", action="store_true", help="leave out the pinv init benchmark")
    parser.add_argument("--results", default=None, help="folder for the JSON and markdown (default benchmarks/results; "
                                                        "a temporary folder for --dry-run)")
    options = parser.parse_args(argv)
    if options.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    os.environ["GORA_KERNELS"] = "1"  # "fused" is the kernels: on CUDA they run only when asked for
    os.environ.pop("GORA_DISABLE_KERNELS", None)
    import torch
    from gora_dist.kernels import triton_installed

    if not triton_installed():
        print("benchmarks/kernel_speed.py: triton is not installed (pip install triton, or pip install -e '.[test]')")
        return 2
    if options.dry_run:
        device, timer, tokens_list, shapes, layers = "cpu", make_timer(True), [16, 40], DRY_RUN_SHAPES, 2
        projections = {"q_proj": (48, 48), "k_proj": (24, 48)}
    elif torch.cuda.is_available():
        device, timer, shapes, layers, projections = "cuda", make_timer(False), None, LAYERS, PROJECTIONS
        tokens_list = [2048, 8192] if options.quick else TOKENS
        shapes = {kind: PROJECTIONS[p] for kind, p in SHAPE_OF_KIND.items()}
    else:
        print("benchmarks/kernel_speed.py needs a CUDA GPU and found none; nothing was measured. "
              "Run it on a GPU machine, or pass --dry-run to check the script under the Triton interpreter.")
        return 2
    ranks = rank_map()
    rank_counts = {str(r): sum(1 for v in ranks.values() if v == r) for r in sorted(set(ranks.values()))}
    chosen = ranks_per_kind(ranks, options.quick or options.dry_run)
    if options.dry_run:
        chosen = {kind: chosen[kind][:1] for kind in shapes}
        ranks = {f"model.layers.{i}.{p}": ranks[f"model.layers.{i}.{p}"] for i in range(layers) for p in projections}
    print(f"rank map (rank: layers): {rank_counts}; timing ranks {chosen}")
    meta = {**environment(device), "dry_run": options.dry_run, "quick": options.quick, "tokens": tokens_list}
    results_dir = options.results or (tempfile.mkdtemp(prefix="gora-kernels-dry-run-") if options.dry_run
                                      else os.path.join(ROOT, "benchmarks", "results"))
    # written after each part, so a run cut off (the GPU suite's time limit) keeps what it measured
    layer_results = layer_rows(chosen, tokens_list, shapes, device, timer)
    write_results(results_dir, meta, layer_results, [], [], rank_counts)
    grouped = grouped_rows(chosen, tokens_list, shapes, device, timer)
    write_results(results_dir, meta, layer_results, grouped, [], rank_counts)
    init_timer = make_timer(options.dry_run, rep_ms=2000)  # one call takes tens of ms: more repetitions
    init = [] if options.skip_init else init_rows(ranks, device, init_timer, projections, layers)
    stem = write_results(results_dir, meta, layer_results, grouped, init, rank_counts)
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
