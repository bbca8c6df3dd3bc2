"""Tests of evaluation: metrics, bias correction with a known slope, gap AUC, predict."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.predictor import FakeCohort

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.datasets import CohortDataset
from brainage_core.models.cnn import BrainAgeCNN
from brainage_core.models.evaluation import (
    BiasCorrection,
    gap_auc,
    predict,
    prediction_metrics,
    prediction_table,
    regression_metrics,
)

torch.set_num_threads(1)


def test_regression_metrics_on_known_values():
    age = np.array([50.0, 60.0, 70.0, 80.0])
    pred = age + np.array([1.0, -1.0, 3.0, -3.0])
    m = regression_metrics(age, pred)
    assert m["mae"] == pytest.approx(2.0)
    assert m["rmse"] == pytest.approx(math.sqrt(5.0))
    assert m["r2"] == pytest.approx(1 - 20.0 / 500.0)
    assert m["r"] == pytest.approx(np.corrcoef(age, pred)[0, 1])
    assert regression_metrics(age, age)["mae"] == 0
    with pytest.raises(BrainAgeInputError, match="same length"):
        regression_metrics(age, pred[:3])


def test_bias_correction_removes_a_known_age_bias():
    rng = np.random.default_rng(0)
    # Regression to the mean: pred - age = -0.4 * (age - 60) + planted gap.
    age_val, age_test = rng.uniform(45, 80, 200), rng.uniform(45, 80, 100)
    true_gap = rng.normal(0, 2, 100)
    pred_val = age_val - 0.4 * (age_val - 60) + rng.normal(0, 0.01, 200)
    pred_test = age_test - 0.4 * (age_test - 60) + true_gap
    corr = BiasCorrection.fit(age_val, pred_val)
    assert corr.slope == pytest.approx(-0.4, abs=1e-3)
    assert corr.intercept == pytest.approx(24.0, abs=0.1)
    gap = corr.corrected_gap(age_test, pred_test)
    np.testing.assert_allclose(gap, true_gap, atol=0.05)
    # The raw gap depends on age; the corrected one only as much as the planted gap does.
    assert abs(np.corrcoef(age_test, pred_test - age_test)[0, 1]) > 0.8
    planted = abs(np.corrcoef(age_test, true_gap)[0, 1])
    assert abs(np.corrcoef(age_test, gap)[0, 1]) == pytest.approx(planted, abs=0.02)
    np.testing.assert_allclose(corr.corrected_prediction(age_test, pred_test),
                               age_test + gap)


def test_bias_correction_needs_distinct_ages():
    with pytest.raises(BrainAgeInputError, match="at least 2 subjects with different ages"):
        BiasCorrection.fit([60.0, 60.0], [61.0, 59.0])


def test_gap_auc():
    group = np.array(["control"] * 5 + ["accelerated"] * 5)
    assert gap_auc(np.arange(10.0), group) == 1.0
    assert gap_auc(-np.arange(10.0), group) == 0.0
    assert math.isnan(gap_auc(np.arange(10.0), ["control"] * 10))


def test_predict_on_dataset_and_cohort_matches_forward_and_restores_mode():
    cohort = FakeCohort(n=10)
    torch.manual_seed(0)
    model = BrainAgeCNN(cohort.images.shape[1:], channels=[4, 8], norm="batch").train()
    ds = CohortDataset(cohort)
    p = predict(model, ds, batch_size=3)
    assert model.training
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    expected = model.eval()(x).detach().numpy()
    np.testing.assert_allclose(p, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(predict(model, cohort, split="test"),
                               expected[cohort.indices("test")], rtol=1e-5, atol=1e-4)


def test_prediction_table_and_metrics_on_a_fake_cohort():
    cohort = FakeCohort(n=40, seed=2)
    t = cohort.table
    # A predictor that sees biological age perfectly but regresses to the mean.
    pred = (t["age"] + t["gap"]).to_numpy() * 0.7 + 0.3 * 60
    table, corr = prediction_table(cohort, pred)
    assert list(table.columns[:5]) == ["participant_id", "age", "sex", "site", "split"]
    np.testing.assert_allclose(table["gap"], pred - t["age"])
    assert corr.slope == pytest.approx(-0.3, abs=0.15)
    m = prediction_metrics(table, corr, oracle_mae=1.0)
    test = table[table["split"] == "test"]
    assert m["test_mae"] == pytest.approx(np.mean(np.abs(test["predicted_age"] - test["age"])))
    assert m["ratio_test_oracle"] == pytest.approx(m["test_mae"])
    assert m["n_train"] + m["n_val"] + m["n_test"] == 40
    assert m["gap_corr_true_gap"] > 0.9
    assert m["test_mae_corrected"] < m["test_mae"]
    assert "baseline_mae" not in m
    table["baseline_predicted_age"] = table["age"] - 2.0
    m = prediction_metrics(table, corr)
    assert m["baseline_mae"] == pytest.approx(2.0)
    assert m["ratio_test_baseline"] == pytest.approx(m["test_mae"] / 2.0)
    assert "oracle_mae" not in m
    with pytest.raises(BrainAgeInputError, match="one value per subject"):
        prediction_table(cohort, pred[:5])


def test_prediction_figures_static_and_interactive(tmp_path):
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    from brainage_core.plotting import prediction as plots

    cohort = FakeCohort(n=40, seed=2)
    pred = cohort.table["age"].to_numpy() + 1.0
    table, _ = prediction_table(cohort, pred)
    fig = plots.plot_age_prediction(table, output_file=tmp_path / "a.png", title="t")
    assert fig.axes[0].get_title() == "t" and (tmp_path / "a.png").stat().st_size > 0
    fig2 = plots.plot_gap_vs_age(table, split=["val", "test"])
    assert len(fig2.axes) == 2
    plt.close("all")
    inter = plots.plot_age_prediction_interactive(table, output_file=tmp_path / "a.html")
    assert isinstance(inter, go.Figure) and (tmp_path / "a.html").stat().st_size > 0
    test_ids = set(table.loc[table["split"] == "test", "participant_id"])
    shown = {row[0] for trace in inter.data if trace.customdata is not None
             for row in trace.customdata}
    assert shown == test_ids
    assert "customdata[0]" in inter.data[0].hovertemplate
    gap = plots.plot_gap_vs_age_interactive(table)
    assert {t.xaxis for t in gap.data} == {"x", "x2"}
    with pytest.raises(BrainAgeInputError, match="no subjects in split 'holdout'"):
        plots.plot_age_prediction(table, split="holdout")
