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
