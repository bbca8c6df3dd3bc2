"""Presets, config files, dotted overrides and run names."""

from __future__ import annotations

import pytest
import yaml

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.study.config import (
    PRESETS,
    TOP_LEVEL_KEYS,
    config_hash,
    dump_config,
    load_config,
    load_preset,
    run_name,
)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load_and_validate(preset):
    overrides = [("data.path", "/data/bids")] if preset == "paper" else []
    config = load_config(preset, overrides=overrides)
    assert config["name"] == preset
    assert set(config) <= set(TOP_LEVEL_KEYS)
    assert config["data"]["source"] in ("synthetic", "bids")
    assert isinstance(config["prediction"], dict) and isinstance(config["maps"], dict)
    # YAML round trip is lossless: config.yaml reproduces the run's config exactly
    assert yaml.safe_load(dump_config(config)) == config


def test_presets_scale_up():
    quick, default = load_preset("quick"), load_preset("default")
    assert quick["data"]["synthetic"]["n_subjects"] < default["data"]["synthetic"]["n_subjects"]
    assert quick["data"]["resolution"] >= default["data"]["resolution"]
    assert load_preset("paper")["data"]["resolution"] <= 2


def test_paper_preset_needs_a_data_path():
    with pytest.raises(BrainAgeInputError, match=r"'data\.path' is required"):
        load_config("paper")


def test_overrides_are_parsed_as_yaml():
    config = load_config("quick", overrides=[
        ("prediction.epochs", "3"),
        ("data.split_fractions", "[0.6, 0.2, 0.2]"),
        ("data.on_error", "skip"),
        ("seed", "7"),
    ])
    assert config["prediction"]["epochs"] == 3
    assert config["data"]["split_fractions"] == [0.6, 0.2, 0.2]
    assert config["data"]["on_error"] == "skip"
    assert config["seed"] == 7
    assert load_preset("quick")["prediction"]["epochs"] != 3  # presets are not mutated


def test_config_file_is_merged_over_the_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ndata:\n  synthetic:\n    n_subjects: 50\n")
    config = load_config("quick", config_file=path, overrides=[("data.synthetic.seed", "3")])
    assert config["name"] == "mine"
    assert config["data"]["synthetic"]["n_subjects"] == 50
    assert config["data"]["synthetic"]["seed"] == 3
    assert config["data"]["resolution"] == load_preset("quick")["data"]["resolution"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ([("predictions.epochs", "3")], r"'predictions\.epochs'.*not a config section"),
        ([("data.resolutoin", "4")], r"'data'.*\['resolutoin'\]"),
        ([("data.source", "ukbb")], r"'data\.source' must be one of"),
        ([("data.resolution", "5")], r"'data\.resolution' must be one of"),
        ([("data.split_fractions", "[0.5, 0.5]")], r"split_fractions"),
        ([("name", "my run")], r"'name'"),
        ([("seed", "-1")], r"'seed'"),
        ([("data.resolution.x", "1")], r"'data\.resolution' holds the value"),
        ([("prediction", "3")], r"'prediction' must be a mapping"),
    ],
)
def test_bad_keys_and_values_give_clear_errors(overrides, match):
    with pytest.raises(BrainAgeInputError, match=match):
        load_config("quick", overrides=overrides)


def test_bad_config_files_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(BrainAgeInputError, match="nope.yaml: config file does not exist"):
        load_config("quick", config_file=missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  epochs: 3\n")
    with pytest.raises(BrainAgeInputError, match=r"bad\.yaml: unknown top-level key.*training"):
        load_config("quick", config_file=bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(BrainAgeInputError, match="broken.yaml: not valid YAML"):
        load_config("quick", config_file=broken)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(BrainAgeInputError, match=r"'preset' must be one of .*'huge'"):
        load_config("huge")


def test_run_names_differ_with_parameters_and_are_stable():
    base = load_config("quick")
    assert run_name(base) == run_name(load_config("quick"))
    assert run_name(base).startswith("quick-")
    other = load_config("quick", overrides=[("prediction.epochs", "5")])
    assert run_name(other) != run_name(base)
    reordered = dict(reversed(list(base.items())))
    assert config_hash(reordered) == config_hash(base)  # key order does not matter


def test_section_validators_reject_unknown_keys():
    """Sections owned by other modules are checked by the module that declares them."""
    from brainage_core.study.config import SECTION_VALIDATORS

    assert set(SECTION_VALIDATORS) == {"data", "data.synthetic", "data.bids", "prediction",
                                       "maps"}
    for section in SECTION_VALIDATORS:
        key = f"{section}.no_such_knob"
        with pytest.raises(BrainAgeInputError, match=f"config section '{section}'"):
            load_config("quick", overrides=[(key, "1")])
