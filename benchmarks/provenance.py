"""Where a benchmark's figures came from: the commit, whether the tree had uncommitted changes, and
package versions, for the metadata every result file carries."""

from __future__ import annotations

import os
import subprocess
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(short: bool = True) -> str:
    """HEAD's hash ("" outside a git checkout)."""
    command = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def git_dirty(*paths: str, untracked: bool = True) -> bool:
    """Uncommitted changes under ``paths`` (the whole tree when none), untracked files included or not."""
    command = ["git", "status", "--porcelain", *([] if untracked else ["--untracked-files=no"]), "--", *paths]
    try:
        return bool(subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip())
    except OSError:
        return False


def package_versions(*names: str) -> dict:
    """{package: installed version or None}."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found
