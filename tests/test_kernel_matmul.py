"""The shared GEMM (kernels/matmul.py): one tile per size key unless autotuning is asked for, and int64
reduction offsets past 2^31 elements (its own interpreter child, so a crash fails only that test).
No case here needs the interpreter run of test_interpreter_suite (tests/test_kernel_dispatch.py), which
still runs the tile test again under TRITON_INTERPRET=1. Everything skips without triton.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' brings it)")

from kernel_cases import INTERPRETED
from kernel_cases import _kernels_asked_for  # noqa: F401  (autouse: the tests here ask for the kernels)


# --- offsets past 2^31 elements ---------------------------------------------------------------------------

_HUGE_OFFSETS_CHILD = """
import os, sys, torch
from gora_dist.kernels.matmul import two_product_matmul
from gora_dist.kernels.pinv_solve import projected_gradient_triton

K, N, STRIDE = 32, 16, 2 ** 27  # element (K-1)·STRIDE = 31·2^27 ≈ 4.2e9 > 2^31 - 1
numel = (K - 1) * STRIDE + N
path = os.path.join(sys.argv[1], "sparse.bin")
with open(path, "wb") as handle:
    handle.truncate(numel * 4)  # sparse: no disk blocks, no memory until a page is touched
storage = torch.from_file(path, shared=True, size=numel, dtype=torch.float32)
gen = torch.Generator().manual_seed(0)
values = torch.randn(K, N, generator=gen)
wide = storage.as_strided((K, N), (STRIDE, 1))  # K rows, STRIDE elements apart
wide.copy_(values)  # touches K pages
p1 = torch.randn(8, K, generator=gen)
out = two_product_matmul(torch.empty(8, N), p1, wide)  # ks * stride_q1k: dA = dS^T·x, K = tokens
torch.testing.assert_close(out, p1 @ values, atol=1e-5, rtol=1e-5)
q1 = torch.randn(K, 8, generator=gen)
out = two_product_matmul(torch.empty(N, 8), wide.t(), q1)  # ks * stride_p1k: dB = dY^T·S
torch.testing.assert_close(out, values.t() @ q1, atol=1e-5, rtol=1e-5)
lora_a = torch.randn(3, K, generator=gen)
got = projected_gradient_triton(wide.t(), lora_a)  # Ḡ rows with a column stride of 2^27
torch.testing.assert_close(got, values.t() @ lora_a.t(), atol=1e-5, rtol=1e-5)
print("ok")
"""


@pytest.mark.skipif(INTERPRETED, reason="runs its own interpreter child")
def test_reduction_offsets_past_2_31_elements(tmp_path):
    """Reduction offsets (k index × stride) are int64: dA and dB reduce over tokens, and tokens × width
    passes 2^31 elements at ~150k tokens of a 14336-wide layer. Such a tensor cannot be allocated here,
    so the operands are (K, 16) views, 2^27 elements apart, of a sparse 16 GiB memory-mapped file (only
    the K touched pages exist). With int32 offsets the interpreter wraps them (as a GPU would) and the
    load reads 512 MiB before the buffer: a crash or wrong values. Own child process, so a crash fails
    this test only."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "GORA_DISABLE_KERNELS": ""}
    result = subprocess.run([sys.executable, "-c", _HUGE_OFFSETS_CHILD, str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", (result.returncode, result.stderr[-3000:])



def test_one_tile_per_key_unless_autotuning_is_asked_for(monkeypatch):
    """Without GORA_KERNEL_AUTOTUNE a key compiles one tile and benchmarks none; every rank up to 32
    shares a key (a 1B model's 29 distinct ranks tuned one by one timed out on an H200)."""
    import triton

    from gora_dist.kernels import matmul

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3)
               for m, n in [(128, 128), (128, 64), (128, 32), (32, 32)]]
    monkeypatch.delenv(matmul.AUTOTUNE_ENV, raising=False)
    assert [c.kwargs["BLOCK_N"] for c in matmul.fitting_configs(configs, 4096, 8)] == [32]
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in matmul.fitting_configs(configs, 8, 4096)] == [(32, 32)]
    assert [c.kwargs["BLOCK_N"] for c in matmul.fitting_configs(configs, 4096, 4096)] == [128]
    monkeypatch.setenv(matmul.AUTOTUNE_ENV, "1")
    assert len(matmul.fitting_configs(configs, 4096, 4096)) == 4 and len(matmul.fitting_configs(configs, 4096, 8)) == 2
    assert {matmul.size_bucket(r) for r in range(1, 33)} == {32} and matmul.size_bucket(33) == 64
