"""``import gora_dist`` from a plain checkout, without ``pip install`` (launch/train.py runs that way).

setup.py installs the top-level ``kernels/`` as ``gora_dist.kernels``; a checkout has no such folder
inside ``gora_dist/``, so ``gora_dist/__init__.py`` loads it from ``<checkout>/kernels``. The test copies
the package folders into a temporary directory and imports from there in a child process, run with
``python -S`` (no .pth files, so the editable install of this repository cannot answer the import)
and site-packages appended for torch, then once more with site enabled (the editable finder present:
the copy must still win for both packages).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import importlib.util, os, sys
import gora_dist, gora_dist.kernels, gora_dist.kernels.dispatch, gora_dist.layers
copy = os.path.realpath(sys.argv[1])
for module in (gora_dist, gora_dist.kernels, gora_dist.kernels.dispatch):
    assert os.path.realpath(module.__file__).startswith(copy + os.sep), (module.__name__, module.__file__)
assert gora_dist.layers.triton_can_run is gora_dist.kernels.triton_can_run
# only kernels/ is mapped: other top-level folders of the checkout do not become gora_dist.X
assert importlib.util.find_spec("gora_dist.tests") is None and importlib.util.find_spec("gora_dist.launch") is None
print("ok")
"""


def _bare_copy(tmp_path) -> str:
    copy = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("gora_dist", "kernels", "launch"):
        shutil.copytree(os.path.join(REPO, folder), copy / folder, ignore=ignore)
    shutil.copy(os.path.join(REPO, "setup.py"), copy / "setup.py")
    return str(copy)


def _run(args, copy, pythonpath, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    result = subprocess.run([sys.executable, *args, "-c", CHILD, copy], env=env, cwd=cwd,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr[-3000:]


def test_import_from_a_checkout_without_install(tmp_path):
    copy = _bare_copy(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run(["-S"], copy, [copy, *site.getsitepackages()], str(elsewhere))  # no editable finder at all
    _run([], copy, [copy], str(elsewhere))  # editable finder of /work/main installed: the copy still wins
