"""Compute kernels of gora_dist, installed as ``gora_dist.kernels``.

Each op has a pure-torch reference (``reference.py``) and a Triton version beside it:

- ``lora.py``: y = x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ, forward and backward, any rank ≥ 1;
- ``grouped_lora.py``: several such projections sharing x (q/k/v, gate/up), one shrink for all;
- ``pinv_solve.py``: GoRA's B0 = -ξ·Ḡ·A0ᵀ·(A0A0ᵀ)⁻¹, and C = Ḡ·A0ᵀ alone for sharded plans;
- ``matmul.py``: the one GEMM kernel they are built from.

The functional entries (``functional.py``, re-exported here) run Triton where it is wanted and can
run (CUDA tensors with ``GORA_KERNELS=1``, or CPU tensors under ``TRITON_INTERPRET=1``) and the
reference otherwise; ``GORA_DISABLE_KERNELS=1`` forces the reference. On CUDA the default is the
reference: measured faster on an H200 (dispatch.py says by how much). The Triton modules are imported on first use only,
so importing this package never imports triton.
See docs/kernels.md.
"""


def _yield_to_the_installed_kernels_package() -> bool:
    """Imported as a top-level ``kernels`` (the checkout's root on ``sys.path``), step aside.

    This folder is ``gora_dist.kernels``; ``kernels`` on PyPI is Hugging Face's kernel hub, which
    transformers ≥ 5.25 requires and imports at start-up. A script or test run from the checkout's root
    (``python -m pytest``, a benchmark that puts the checkout first) would otherwise hand transformers
    this folder instead. So the installed package is loaded in its place, from the rest of ``sys.path``.
    Where none is installed this folder loads as before: it has no ``__version__``, which is what
    transformers' probe (an import where no distribution is found) reads as "no usable kernels".
    """
    import importlib.machinery
    import importlib.util
    import os
    import sys

    checkout = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rest = [entry for entry in sys.path if os.path.realpath(entry or os.getcwd()) != checkout]
    spec = importlib.machinery.PathFinder.find_spec("kernels", rest)
    if spec is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the import system returns sys.modules["kernels"]: the installed package
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise
    return True


if __name__ != "kernels" or not _yield_to_the_installed_kernels_package():
    from .dispatch import (
        KERNEL_DTYPES,
        kernels_asked_for,
        kernels_disabled,
        kernels_run_on,
        triton_can_run,
        triton_installed,
    )
    from .functional import grouped_lora_linear, lora_linear, projected_gradient
    from .reference import (
        grouped_lora_linear_reference,
        lora_linear_reference,
        pinv_init_b_reference,
        projected_gradient_reference,
    )

__all__ = [
    "KERNEL_DTYPES",
    "grouped_lora_linear",
    "grouped_lora_linear_reference",
    "kernels_asked_for",
    "kernels_disabled",
    "kernels_run_on",
    "lora_linear",
    "lora_linear_reference",
    "pinv_init_b_reference",
    "projected_gradient",
    "projected_gradient_reference",
    "triton_can_run",
    "triton_installed",
]
