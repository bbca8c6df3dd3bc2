"""``brainage-study bench predict``: the figures it prints, and what the predictor reads."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.bench import predict as bench

TINY = ["--preset", "quick", "--n-subjects", "40", "-p", "prediction.epochs", "1",
        "-p", "prediction.channels", "[4, 8]", "-p", "prediction.batch_size", "8"]


def test_bench_predict_prints_the_figures_and_what_the_predictor_reads(tmp_path, capsys):
    figures = bench.run([*TINY, "--cache-dir", str(tmp_path / "cache"),
                         "--out", str(tmp_path / "out"), "--reliance", "2"])
    out = capsys.readouterr().out
    assert (tmp_path / "out" / "results.json").is_file()
    assert figures["n_subjects"] == 40 and figures["epochs_run"] == 1
    assert math.isclose(figures["ratio_test_baseline"],
                        figures["test_mae"] / figures["baseline_mae"])
    # quick's cohort plants three effects; each gets a share, and the shares add up
    shares = figures["reliance"]
    assert [k.split(" ")[0] for k in shares] == [
        "ventricle_expansion", "atrophy_intensity", "cortical_thinning_intensity"]
    assert math.isclose(sum(shares.values()), 1.0, rel_tol=1e-6)
    assert "what the predictor reads (2 test subjects" in out
    assert "ratio test / baseline" in out


def test_robustness_rows_carry_the_reliance(tmp_path, capsys):
    result = bench.run([*TINY[:2], "-p", "prediction.epochs", "1", "-p",
                        "prediction.channels", "[4, 8]", "-p", "prediction.min_steps", "null",
                        "--robustness", "--cases", "ventricles", "--n-scale", "0.1",
                        "--cache-dir", str(tmp_path / "cache"), "--reliance", "1"])
    (row,) = result["robustness"]
    assert row["case"] == "ventricles" and row["n"] == 40
    assert row["reliance_%"] == "100"  # one planted effect: all of the response is its
    assert "reliance_%" in capsys.readouterr().out


def test_reliance_bad_input_gives_clear_errors():
    with pytest.raises(BrainAgeInputError, match="'--reliance' must be a non-negative integer"):
        bench.run(["--reliance", "-1"])
    with pytest.raises(BrainAgeInputError, match="'--reliance' must be a positive integer"):
        bench.reliance_shares(None, None, 0)  # type: ignore[arg-type]
    real = SimpleNamespace(metadata={"source": "bids", "source_root": "/data/bids"})
    with pytest.raises(BrainAgeInputError, match="needs a synthetic cohort.*'bids'"):
        bench.reliance_shares(None, real, 4)  # type: ignore[arg-type]
