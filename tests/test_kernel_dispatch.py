"""Across the kernels: when they run (GORA_KERNELS, GORA_DISABLE_KERNELS), the interpreter run of every
kernel test file, their compile for sm_90 without a GPU, launches on a non-current GPU, and the benchmark
script's CPU-side logic.

How the CPU cases run: Triton's interpreter must be switched on (``TRITON_INTERPRET=1``) before the
kernel modules are first imported, and setting it inside this pytest process would leak into every
other test module (collection imports them all first). So in a normal session the CPU cases of
tests/test_kernel_*.py are skipped and ``test_interpreter_suite`` runs those files again in ONE child
pytest with the variable set, where they run (and the GPU cases skip). GPU cases (names contain ``gpu``)
run in-process when CUDA is there, without the interpreter. Everything skips, with the reason, when
triton is not installed. Shapes are small on purpose: the interpreter runs every program instance in numpy.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' brings it)")

from gora_dist.kernels import lora_linear, lora_linear_reference, projected_gradient_reference
from kernel_cases import HAS_CUDA, INTERPRETED, _gradient_and_a, _layer, _outputs_and_grads, _relative_error, gpu
from kernel_cases import _kernels_asked_for  # noqa: F401  (autouse: the tests here ask for the kernels)

# every kernel test file, this one included: test_interpreter_suite runs their CPU cases in one child
KERNEL_TEST_FILES = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_kernel_*.py")))


def test_the_kernels_run_on_cuda_only_when_asked_for(monkeypatch):
    from gora_dist.kernels import kernels_run_on

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert kernels_run_on(cuda) and kernels_run_on(cpu) == INTERPRETED
    monkeypatch.delenv("GORA_KERNELS")
    assert not kernels_run_on(cuda) and kernels_run_on(cpu) == INTERPRETED  # the default: torch on CUDA
    monkeypatch.setenv("GORA_KERNELS", "1")
    monkeypatch.setenv("GORA_DISABLE_KERNELS", "1")
    assert not kernels_run_on(cuda) and not kernels_run_on(cpu)


@pytest.mark.skipif(INTERPRETED, reason="this is the child run")
def test_interpreter_suite():
    """Run the CPU cases of every kernel test file (KERNEL_TEST_FILES) under TRITON_INTERPRET=1 in one child
    pytest (see the module docstring)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "GORA_DISABLE_KERNELS": ""}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TEST_FILES, "-k",
               "not gpu and not interpreter_suite and not sm90 and not benchmark_script and not past_2_31"]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                            cwd=os.path.dirname(__file__), check=False)
    summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"interpreter run: {summary} ({time.perf_counter() - start:.1f} s)")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in summary and "skipped" not in summary, summary


@pytest.mark.skipif(INTERPRETED, reason="compiles for a real GPU target; not needed in the interpreter run")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not compile; this lowers the kernels to PTX/cubin for an H100 (sm_90), no
    device needed, so GPU-only compile errors show up on CPU machines too."""
    from gora_dist.kernels import matmul, pinv_solve
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile
    from triton.runtime.autotuner import Autotuner

    def build(kernel, pointer_types, scalar_types, constants, **options):
        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel  # the autotuner wraps the jitted function
        signature = {}
        for name in fn.arg_names:
            signature[name] = "constexpr" if name in constants else pointer_types.get(name) or scalar_types.get(name, "i32")
        constexprs = {(fn.arg_names.index(name),): value for name, value in constants.items()}
        return triton_compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=options)

    floats = {"alpha1": "fp32", "alpha2": "fp32"}
    # (layer dtype, UPCAST1, PRECISION1, PRECISION2) as the launcher picks them: a 16-bit forward, a float32
    # layer, and a 16-bit dY against float32 B (dS, upcast, TF32)
    for layer, upcast, precision1, precision in [("bf16", False, "ieee", "tf32"), ("fp32", False, "ieee", "ieee"),
                                                 ("bf16", True, "tf32", "tf32")]:
        pointers = {name: "*fp32" for name in ("out_ptr", "p2_ptr", "q2_ptr", "c_in_ptr")}
        pointers.update(p1_ptr=f"*{layer}", q1_ptr="*fp32" if upcast else f"*{layer}", bias_ptr=f"*{layer}")
        constants = {"HAS_P2": True, "HAS_BIAS": True, "HAS_C_IN": True, "UPCAST1": upcast, "PRECISION1": precision1,
                     "PRECISION2": precision, "BLOCK_K2": 32, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}
        compiled = build(matmul._two_product_kernel, pointers, floats, constants, num_warps=8, num_stages=3)
        assert "cubin" in compiled.asm, list(compiled.asm)
    # Without autotuning nothing skips a tile that overflows shared memory: the tile taken for each kind of
    # output (wide, tokens × rank, rank × wide) must fit an H100 with float32 operands (the largest case)
    h100_shared_limit = 232_448
    pointers = {name: "*fp32" for name in ("out_ptr", "p1_ptr", "q1_ptr", "p2_ptr", "q2_ptr", "bias_ptr", "c_in_ptr")}
    taken = {id(matmul.fitting_configs(matmul._two_product_kernel.configs, m, n)[0]): (m, n)
             for m, n in [(8192, 4096), (8192, 8), (8, 4096), (8192, 48), (48, 4096), (8, 8)]}
    assert len(taken) >= 3  # wide, narrow-N and narrow-M outputs take different tiles
    for config in matmul._two_product_kernel.configs:
        if id(config) not in taken:
            continue
        constants = {"HAS_P2": True, "HAS_BIAS": True, "HAS_C_IN": True, "UPCAST1": False, "PRECISION1": "ieee",
                     "PRECISION2": "ieee", "BLOCK_K2": 64, **config.kwargs}
        compiled = build(matmul._two_product_kernel, pointers, floats, constants, num_warps=config.num_warps,
                         num_stages=config.num_stages)
        assert compiled.metadata.shared <= h100_shared_limit, (config, compiled.metadata.shared)
    # The pinv kernel is not autotuned, so the configs its launcher picks must fit an H100's shared memory
    # (232,448 B per block): the largest rank with the K⁻¹ epilogue, and the largest rank at all, asked
    # with and without a solve (above MAX_SOLVE_RANK the launcher leaves the solve to torch).
    pointers = {name: "*fp32" for name in ("out_ptr", "grad_ptr", "a_ptr", "kinv_ptr")}
    for rank, solve in [(pinv_solve.MAX_SOLVE_RANK, True), (pinv_solve.MAX_RANK, True), (pinv_solve.MAX_RANK, False)]:
        config = pinv_solve.launch_config(rank, solve)
        options = {key: config.pop(key) for key in ("num_warps", "num_stages")}
        compiled = build(pinv_solve._project_solve_kernel, pointers, {"neg_xi": "fp32"}, config, **options)
        assert "cubin" in compiled.asm
        assert compiled.metadata.shared <= h100_shared_limit, (rank, config, compiled.metadata.shared)



@gpu
@pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_tensors_on_a_device_other_than_the_current_one():
    """Triton launches on the current device: the launchers switch to the tensors' device first."""
    from gora_dist.kernels.pinv_solve import projected_gradient_triton

    x, weight, bias, lora_a, lora_b, grad_out = _layer(torch.float32, 5, device="cuda:1")
    with torch.cuda.device(0):
        got = _outputs_and_grads(lora_linear, x, weight, bias, lora_a, lora_b, 1.5, grad_out)
        grad, a0 = _gradient_and_a(rows=64, cols=96, rank=8)
        c = projected_gradient_triton(grad.to("cuda:1"), a0)
        torch.cuda.synchronize(1)
    want = _outputs_and_grads(lora_linear_reference, x, weight, bias, lora_a, lora_b, 1.5, grad_out)
    for name, g, w in zip(["y", "dX", "dA", "dB"], got, want):
        assert g.device == w.device and _relative_error(g, w) < 1e-5, (name, _relative_error(g, w))
    assert _relative_error(c.cpu(), projected_gradient_reference(grad, a0)) < 1e-5


# --- the benchmark script's CPU-side logic (it needs CUDA to measure anything) -----------------------------

@pytest.mark.skipif(INTERPRETED, reason="no kernels run here")
def test_benchmark_script_tables_and_results(tmp_path, capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "kernel_speed.py")
    spec = importlib.util.spec_from_file_location("kernels_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ranks = bench.rank_map()
    assert len(ranks) == 224 and min(ranks.values()) == 4 and max(ranks.values()) <= 32
    chosen = bench.ranks_per_kind(ranks, quick=False)
    assert set(chosen) == {"q/o", "k/v", "gate/up", "down"} and all(4 <= r <= 32 for rs in chosen.values() for r in rs)
    if not torch.cuda.is_available():
        assert bench.main([]) == 2 and "needs a CUDA GPU" in capsys.readouterr().out
    layers = [{"kind": "q/o", "rank": 8, "tokens": 2048, "impl": impl, **{f"{m}_ms": [1.0, 0.9, 1.1] for m in bench.MODES}}
              for impl in bench.IMPLEMENTATIONS]
    grouped = [{"kind": "q+k+v", "ranks": [8, 4, 6], "tokens": 2048, "impl": i, "full_ms": [2.0, 1.9, 2.1]}
               for i in ("grouped", "separate")]
    init = [{"impl": "fused", "layers": 224, "total_ms": [10.0, 9.0, 11.0]}]
    meta = {"gpu": "Test GPU 80GB", "cuda": "12.x", "versions": {}, "commit": "abc", "date": "today", "dry_run": False}
    stem = bench.write_results(str(tmp_path), meta, layers, grouped, init, {"4": 1})
    assert stem.endswith("kernels_test_gpu_80gb")
    with open(stem + ".md") as handle:
        table = handle.read()
    assert "| q/o | 8 | 2048 | full |" in table and "| fused | 10.00 (9.00-11.00) |" in table
