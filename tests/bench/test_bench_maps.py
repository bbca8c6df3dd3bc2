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
