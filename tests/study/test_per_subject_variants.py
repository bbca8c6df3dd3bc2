"""Variants of the per-subject noise maps scored side by side (``bench maps --per-subject``)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers.runs import make_compare_run, run_with_noise_model

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.bench.maps import parse_variants, per_subject_run
from brainage_core.study import compare, explain
from brainage_core.study.maps import MapsStudy

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return run_with_noise_model(make_compare_run(root), root / "with_noise",
                                perturbation="replace_mean")


def test_per_subject_variants_score_each_variant_from_the_runs_settings(run, capsys,
                                                                         tmp_path):
    variants = parse_variants(["budget:mean_b=0.8,coarse=2", "noisy:noise_sd=0.2"])
    assert variants == {"the run's": {}, "budget": {"mean_b": 0.8, "coarse": 2},
                        "noisy": {"noise_sd": 0.2}}
    result = per_subject_run(run.root, variants, steps=4)
    table = pd.DataFrame(result["variants"]).set_index("variant")
    assert list(table.index) == ["the run's", "budget", "noisy"]
    assert (table["steps_run"] == 4).all()  # the stopping rule is off
    assert table.loc["budget", "mean_b_target"] == 0.8
    # the operating point is held: the run's at the amortised model's mean B, 'budget' at 0.8
    assert table.loc["the run's", "mean_b_target"] == pytest.approx(
        result["amortised_mean_b"], abs=1e-6)
    assert table.loc["budget", "mean_b"] == pytest.approx(0.8, abs=0.1)
    assert ((table["b_p5"] <= table["b_p95"]) & table["localisation_auroc"].between(0, 1)).all()
    # the added noise reaches the objective
    assert table.loc["noisy", "objective_first"] != table.loc["the run's", "objective_first"]
    assert "the amortised model's mean map" in capsys.readouterr().out
    study = MapsStudy.open(run.root, progress=False)
    with pytest.raises(BrainAgeInputError, match="'budget'.*cannot be changed"):
        compare.per_subject_variants(study, explain.load_noise_model(study),
                                     {"budget": {"steps": 3}})
    with pytest.raises(BrainAgeInputError, match="coarse"):  # validated as the explainer does
        compare.per_subject_variants(study, explain.load_noise_model(study),
                                     {"bad": {"coarse": 0}}, steps=2)
    additive = run_with_noise_model(run, tmp_path / "additive", perturbation="additive")
    study = MapsStudy.open(additive.root, progress=False)
    with pytest.raises(BrainAgeInputError, match="noise_sd.*replacement.*'additive'"):
        compare.per_subject_variants(study, explain.load_noise_model(study),
                                     {"noisy": {"noise_sd": 0.2}})
    with pytest.raises(BrainAgeInputError, match="--variant must read"):
        parse_variants(["coarse=4"])
