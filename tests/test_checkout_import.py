"""``import gora_dist`` from a plain checkout, without ``pip install`` (launch/train.py runs that way).

setup.py installs the top-level ``kernels/`` as ``gora_dist.kernels``; a checkout has no such folder
inside ``gora_dist/``, so ``gora_dist/__init__.py`` loads it from ``<checkout>/kernels``. The test copies
the package folders into a temporary directory and imports from there in a child process, run with
``python -S`` (no .pth files, so the editable install of this repository cannot answer the import)
and site-packages appended for torch, then once more with site enabled (the editable finder present:
the copy must still win for both packages).
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import site
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import importlib.util, os, sys
import gora_dist, gora_dist.kernels, gora_dist.kernels.dispatch, gora_dist.model.layers
copy = os.path.realpath(sys.argv[1])
for module in (gora_dist, gora_dist.kernels, gora_dist.kernels.dispatch):
    assert os.path.realpath(module.__file__).startswith(copy + os.sep), (module.__name__, module.__file__)
assert gora_dist.model.layers.triton_can_run is gora_dist.kernels.triton_can_run
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


def test_a_regular_install_carries_every_subpackage(tmp_path):
    """A non-editable install (what users on a cluster get) must ship engines/, launcher/, … and
    kernels/ as gora_dist.kernels: editable installs hide a missing entry in setup.py's packages."""
    source_copy = tmp_path / "source"  # a clean tree: a stale build/ in the checkout could mask a missing package
    shutil.copytree(REPO, source_copy, ignore=shutil.ignore_patterns(
        "__pycache__", "*.pyc", "build", "*.egg-info", ".git", ".venv", ".ci-venv", "runs", "tests", "benchmarks"))
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(target), str(source_copy)], capture_output=True, text=True, timeout=600,
                             check=False)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    source = {os.path.relpath(root, REPO) for root, _, files in os.walk(os.path.join(REPO, "gora_dist"))
              if "__init__.py" in files}
    installed = {os.path.relpath(root, target) for root, _, files in os.walk(target / "gora_dist")
                 if "__init__.py" in files}
    assert source | {os.path.join("gora_dist", "kernels")} <= installed, sorted(source - installed)
    child = ("import gora_dist.engines, gora_dist.launcher.runner, gora_dist.integrations.hf_trainer, "
             "gora_dist.kernels, sys; assert gora_dist.__file__.startswith(sys.argv[1]), gora_dist.__file__; print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(target), *site.getsitepackages()])
    result = subprocess.run([sys.executable, "-S", "-c", child, str(target)], env=env, cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr[-3000:]


SHADOW_CHILD = """
import os, sys
import kernels
origin = os.path.realpath(kernels.__file__)
if hasattr(kernels, "ORIGIN"):
    import kernels.layer  # a submodule resolves in the installed package, not in the checkout's folder
    assert kernels.ORIGIN == "installed" and kernels.layer.ORIGIN == "installed layer", origin
    print("installed")
elif origin.startswith(os.path.realpath(os.getcwd()) + os.sep):  # none installed: the folder, as before,
    assert not hasattr(kernels, "__version__")  # without the version transformers' probe looks for
    print("checkout")
else:
    print("site-packages")  # Hugging Face's kernels, installed beside torch (transformers >= 5.25)
import gora_dist.kernels
assert callable(gora_dist.kernels.lora_linear) and gora_dist.kernels.__name__ == "gora_dist.kernels"
print("ok")
"""


def test_the_checkout_root_on_the_path_does_not_shadow_the_installed_kernels_package(tmp_path):
    """transformers ≥ 5.25 imports Hugging Face's ``kernels`` at start-up; run from the checkout's root
    (``python -m pytest``), the import must reach that package, not this repository's ``kernels/``."""
    copy = _bare_copy(tmp_path)
    installed = tmp_path / "installed"
    (installed / "kernels").mkdir(parents=True)
    (installed / "kernels" / "__init__.py").write_text("ORIGIN = 'installed'\n")
    (installed / "kernels" / "layer.py").write_text("ORIGIN = 'installed layer'\n")
    beside_torch = importlib.machinery.PathFinder.find_spec("kernels", site.getsitepackages())
    for extra, expected in (([str(installed)], "installed"), ([], "site-packages" if beside_torch else "checkout")):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PYTHONPATH"] = os.pathsep.join([*extra, *site.getsitepackages()])
        # cwd = the checkout and "-c": sys.path[0] is the checkout's root, ahead of everything else
        result = subprocess.run([sys.executable, "-S", "-c", SHADOW_CHILD], env=env, cwd=copy,
                                capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0 and result.stdout.split() == [expected, "ok"], result.stdout + result.stderr[-3000:]


def test_no_script_folder_shadows_an_installed_module():
    """Running a script puts its folder first on ``sys.path``: a ``benchmarks/kernels.py`` there hid
    Hugging Face's ``kernels`` from transformers. No module in those folders may share a name with an
    installed top-level module (the checkout's own ``kernels/`` steps aside by itself, tested above)."""
    repo = os.path.realpath(REPO)
    installed = [entry for entry in sys.path if entry and os.path.realpath(entry) != repo
                 and not os.path.realpath(entry).startswith(repo + os.sep)]
    clashes = []
    for folder in ("benchmarks", "launch", "tests", os.path.join("tests", "dist")):
        for name in sorted(os.listdir(os.path.join(REPO, folder))):
            stem, ext = os.path.splitext(name)
            if ext == ".py" and stem != "conftest" and (
                    stem in sys.builtin_module_names or importlib.machinery.PathFinder.find_spec(stem, installed)):
                clashes.append(os.path.join(folder, name))
    assert not clashes, f"these shadow installed modules when their folder is on sys.path: {clashes}"
