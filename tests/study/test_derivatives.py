"""The run's BIDS-Derivatives view: names, sidecars, the data dictionary, and pybids indexing it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from bids import BIDSLayout
from helpers.pipeline import make_fake_run

from brainage_core._utils.io import save_nifti, write_table
from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.template import load_template
from brainage_core.study.config import config_hash
from brainage_core.study.derivatives import SPACE, write_derivatives


def _add_maps(run, resolution: int = 8) -> list[str]:
    """Per-image maps of a longitudinal test split, an age band and a method's mean map."""
    tpl = load_template(resolution)
    labels = ["sub-01_ses-01", "sub-01_ses-02", "sub-02_ses-01"]
    rows = []
    for k, label in enumerate(labels):
        path = run.maps / f"{label}_importance.nii.gz"
        save_nifti(tpl.to_image((tpl.mask * (k + 1.0)).astype(np.float32)), path)
        rows.append({"participant_id": label, "age": 50.0 + k, "split": "test",
                     "path": os.path.relpath(path, run.root)})
    write_table(run.tables / "subject_maps.csv", pd.DataFrame(rows))
    save_nifti(tpl.to_image(tpl.mask.astype(np.float32)),
               run.maps / "population_age-50-60_importance.nii.gz")
    save_nifti(tpl.to_image(tpl.mask.astype(np.float32)), run.maps / "method-saliency_mean.nii.gz")
    return labels


def test_derivatives_are_indexed_by_pybids(tmp_path: Path) -> None:
    run = make_fake_run(tmp_path / "run")
    run.update_metrics("prediction", {"bias_slope": -0.3, "bias_intercept": 18.0})
    _add_maps(run)
    out = write_derivatives(run.root)
    assert out == run.root / "derivatives"

    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    generated = desc["GeneratedBy"][0]
    assert generated["Name"] == "brainage-study" and generated["Version"]
    assert generated["ConfigHash"] == config_hash(run.load_config(), 16)

    layout = BIDSLayout(out, validate=False, is_derivative=True)
    maps = layout.get(suffix="map", extension=".nii.gz")
    subject_maps = [f for f in maps if "subject" in f.get_entities()]
    got = sorted((f.entities["subject"], f.entities.get("session")) for f in subject_maps)
    assert got == [("01", "01"), ("01", "02"), ("02", "01")]
    for f in subject_maps:
        ent = f.get_entities()
        assert (ent["space"], ent["res"], ent["desc"], ent["datatype"]) == (
            SPACE, "8", "noiseimportance", "anat")
        meta = f.get_metadata()
        assert meta["Method"] == "noise" and "Units" in meta and "Settings" in meta
    # the per-subject files are the run's maps, not copies of something else
    first = layout.get(subject="01", session="02", suffix="map", extension=".nii.gz")[0]
    np.testing.assert_allclose(nib.load(first.path).get_fdata(),
                               nib.load(run.maps / "sub-01_ses-02_importance.nii.gz").get_fdata())
    group = sorted(f.entities["desc"] for f in maps if "subject" not in f.get_entities())
    assert group == ["noiseimportanceAge50to60", "noiseimportancePopulation", "saliencyMean"]
    band = layout.get(desc="noiseimportanceAge50to60", extension=".nii.gz")[0]
    assert band.get_metadata()["AgeBand"] == [50.0, 60.0]

    table = pd.read_csv(out / "brainage.tsv", sep="\t")
    dictionary = json.loads((out / "brainage.json").read_text())
    assert set(dictionary) == set(table.columns)
    assert dictionary["age"]["Units"] == "year"
    assert "gap" in dictionary and "predicted_age" in dictionary


def test_derivatives_are_rebuilt_and_need_a_run(tmp_path: Path) -> None:
    run = make_fake_run(tmp_path / "run")
    out = write_derivatives(run.root)
    (out / "stale.txt").write_text("left over")
    write_derivatives(run.root)
    assert not (out / "stale.txt").exists()
    with pytest.raises(BrainAgeInputError, match="no config.yaml"):
        write_derivatives(tmp_path / "nothing")
