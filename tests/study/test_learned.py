"""A predictor that did not learn is flagged, and the map steps refuse it unless told."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers.predictor import TINY, FakeCohort

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.models.evaluation import predict, prediction_metrics, prediction_table
from brainage_core.models.training import cohort_datasets, train_predictor
from brainage_core.pipeline.book import _results_index
from brainage_core.study import maps as explain
from brainage_core.study.maps import MapsConfig
from brainage_core.study.rundir import RunDir

torch.set_num_threads(1)


def _train_and_score(cohort: FakeCohort) -> dict:
    cfg = {**TINY, "epochs": 8, "pool": "avg", "patience": 8}
    data = cohort_datasets(cohort, cfg)
    result = train_predictor(cfg, data["train"], data["val"], progress=False)
    table, correction = prediction_table(cohort, predict(result.model, cohort))
    return prediction_metrics(table, correction)


def test_shuffled_ages_are_flagged_and_real_ones_are_not():
    learnable = FakeCohort(n=80, seed=4)
    good = _train_and_score(learnable)
    assert good["learned"] is True, good

    shuffled = FakeCohort(n=80, seed=4)
    train = shuffled.indices("train")
    ages = shuffled.table["age"].to_numpy().copy()
    ages[train] = np.random.default_rng(0).permutation(ages[train])  # no signal left
    shuffled.table["age"] = ages
    bad = _train_and_score(shuffled)
    assert bad["learned"] is False, bad
    assert bad["val_mae"] >= 0.8 * bad["mean_predictor_val_mae"]


def test_map_steps_refuse_an_untrained_predictor_unless_overridden(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_config({"seed": 0, "data": {"source": "csv", "path": str(tmp_path / "none.csv")},
                      "maps": {}})
    run.update_metrics("prediction", {"learned": False, "val_mae": 9.1,
                                      "mean_predictor_val_mae": 9.3})
    with pytest.raises(BrainAgeInputError, match="metrics.json: the predictor did not learn"):
        explain.MapsStudy.open(run.root, progress=False)
    # Overridden: the refusal is a warning, and the step goes on (here to the missing data).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(BrainAgeInputError) as err:
            explain.MapsStudy.open(run.root, overrides={"allow_untrained_predictor": True},
                                   progress=False)
    assert "did not learn" not in str(err.value)
    assert any("did not learn" in str(w.message) for w in caught)
    # A learned predictor passes the check; so does an older run without the key.
    for metrics in ({"learned": True}, {}):
        other = RunDir(tmp_path / f"run{len(metrics)}")
        other.update_metrics("prediction", metrics)
        explain.check_predictor_learned(other, MapsConfig())
    with pytest.raises(BrainAgeInputError, match="true or false"):
        MapsConfig.from_dict({"allow_untrained_predictor": "yes"})


def test_results_page_shows_a_warning_box(tmp_path):
    run = RunDir(tmp_path / "run")
    run.update_metrics("prediction", {"learned": False, "val_mae": 9.1,
                                      "mean_predictor_val_mae": 9.3})
    page = _results_index(run, {"name": "quick"}, [])
    assert "```{warning}" in page and "did not learn" in page
    run.update_metrics("prediction", {"learned": True})
    assert "{warning}" not in _results_index(run, {"name": "quick"}, [])
