"""Cheap checks of the maps benchmark's set-up (the benchmark itself is not run here)."""

from __future__ import annotations

import json

import pytest

from brainage_core.bench import load_benchmark
from brainage_core.bench.maps import REPLANTS, _parse
from brainage_core.data.synth.config import SynthConfig
from brainage_core.study.config import load_config


@pytest.mark.parametrize("name", sorted(REPLANTS))
def test_replanted_effects_are_valid_synth_configs(name):
    config = load_config(
        "quick", overrides=[("data.synthetic.effects", json.dumps(REPLANTS[name]))]
    )
    synth = SynthConfig.from_dict(config["data"]["synthetic"])
    assert len(synth.effects) == 1
    assert synth.effects[0].regions == REPLANTS[name][0]["regions"]


def test_arguments_and_registration():
    opts = _parse(["--n-subjects", "40", "--replant", "occipital", "-p", "maps.epochs", "2"])
    assert opts.n_subjects == 40 and opts.replant == "occipital"
    assert opts.set == [["maps.epochs", "2"]]
    assert callable(load_benchmark("maps").run)


def test_perturbation_and_seed_arguments_and_the_table():
    from brainage_core.bench.maps import table

    opts = _parse(["--perturbations", "additive,replace_blur", "--seeds", "3"])
    assert opts.perturbations == "additive,replace_blur" and opts.seeds == "3"
    scores = {"localisation_auroc": 0.8, "localisation_auroc_by_effect": {"atrophy": 0.7}}
    compare = {"localisation_auroc": 0.6, "auroc_atrophy": 0.65, "budget_shift_learned": 1.0}
    variant = {
        "perturbation": "replace_mean",
        "seed": 3,
        "population": scores,
        "modes": {
            "amortised": {"comparison_subjects": compare, "ms_per_subject": 2.0},
            "per_subject": {"comparison_subjects": compare, "ms_per_subject": 200.0},
        },
    }
    results = {"default": {"ceiling": {"localisation_auroc": 0.85}, "variants": {"v": variant}}}
    t = table(results).set_index("mode")
    assert list(t.index) == ["ceiling |corr(x, age)|", "amortised", "per_subject"]
    # the amortised row is the population map's, the per-subject row the compared subjects'
    assert t.loc["amortised", "auroc"] == 0.8 and t.loc["amortised", "auroc_compare"] == 0.6
    assert t.loc["per_subject", "auroc"] == 0.6 and t.loc["per_subject", "auroc_atrophy"] == 0.65
    assert t.loc["ceiling |corr(x, age)|", "auroc"] == 0.85


def test_compare_prints_the_table_of_a_run(tmp_path, capsys):
    import pandas as pd

    from brainage_core.bench.maps import compare_run
    from brainage_core.study.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.table("method_comparison").parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "method": ["noise", "integrated_gradients", "random"],
            "localisation_auroc": [0.8, 0.7, 0.5],
            "deletion_auc": [6.0, 7.0, 1.0],
            "sanity_result": ["pass", "pass", "reference"],
            "ms_per_subject": [10.0, 400.0, 0.1],
        }
    ).to_csv(run.table("method_comparison"), index=False)
    result = compare_run(run.root)
    out = capsys.readouterr().out
    assert "integrated_gradients" in out and "noise maps against the goal" in out
    goal = result["goal"]
    assert goal["localisation_auroc"]["met"] is True
    assert goal["deletion_auc"] == {
        "noise": 6.0, "best": 7.0, "best_method": "integrated_gradients", "met": False
    }
    assert goal["cost"]["times_cheaper"] == 40.0 and goal["cost"]["met"] is True
    assert goal["sanity"]["met"] is True


def test_compare_accepts_only_maps_overrides():
    from brainage_core._utils.validation import BrainAgeInputError
    from brainage_core.bench.maps import _maps_overrides

    assert _maps_overrides([["maps.compare_subjects", "4"]]) == {"compare_subjects": 4}
    with pytest.raises(BrainAgeInputError, match="maps"):
        _maps_overrides([["prediction.epochs", "3"]])
