"""``predict``: a trained run applied to new subjects, on a tiny run trained in seconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers.cli import one_error_line
from helpers.qc import rotated

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.cli import main
from brainage_core.data.sources.bids import load_bids
from brainage_core.explain.noise.amortised import NoiseMapExplainer
from brainage_core.models.training import load_predictor
from brainage_core.study.predict import TrainedRun, predict_subjects
from brainage_core.study.rundir import RunDir

torch.set_num_threads(1)


def _bids(cohort: Path) -> pd.DataFrame:
    return load_bids(cohort, require_age=False)


def _copy_run(trained_run: RunDir, where: Path) -> RunDir:
    shutil.copytree(trained_run.root, where)
    return RunDir(where)


def test_predict_reproduces_the_runs_own_predictions(trained_run, tiny_cohort, tmp_path):
    result = predict_subjects(trained_run.root, _bids(tiny_cohort), tmp_path / "out",
                              progress=False)
    run_table = pd.read_csv(trained_run.table("predictions"))
    merged = result.table.merge(run_table, on="participant_id", suffixes=("", "_run"))
    assert len(merged) == len(run_table) == 6
    test = merged[merged["split"] == "test"]
    assert len(test) >= 1
    # the same preprocessing, float16 rounding and model: equal up to float32 batch effects
    np.testing.assert_allclose(test["predicted_age"], test["predicted_age_run"], atol=1e-4)
    np.testing.assert_allclose(test["gap_corrected"], test["gap_corrected_run"], atol=1e-4)
    np.testing.assert_allclose(merged["predicted_age"], merged["predicted_age_run"], atol=1e-4)
    # the run's fitted correction, written beside the table
    coeffs = json.loads((tmp_path / "out" / "bias_correction.json").read_text())
    metrics = trained_run.read_metrics()["prediction"]
    assert coeffs["slope"] == metrics["bias_slope"]
    assert coeffs["intercept"] == metrics["bias_intercept"]
    assert result.metrics["mae"] == pytest.approx(
        np.mean(np.abs(merged["predicted_age"] - merged["age"])))
    assert (result.table["qc_pass"]).all() and (result.table["qc_action"] == "ok").all()
    on_disk = pd.read_csv(tmp_path / "out" / "predictions.tsv", sep="\t")
    assert list(on_disk["participant_id"]) == list(result.table["participant_id"])
    assert (tmp_path / "out" / "qc.html").is_file()
    assert (tmp_path / "out" / "qc_mosaic.png").is_file()


def test_a_moved_run_predicts_without_its_data_cache(trained_run, tiny_cohort, tmp_path):
    reference = predict_subjects(trained_run.root, _bids(tiny_cohort), tmp_path / "a",
                                 progress=False).table
    copy = _copy_run(trained_run, tmp_path / "copy")
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(copy.root, moved)
    # another machine: the training data and its cache are not there
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["data"]["cache_dir"] = str(tmp_path / "no_such_cache")
    config["data"]["path"] = str(tmp_path / "no_such_bids")
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    again = predict_subjects(moved, _bids(tiny_cohort), tmp_path / "b", progress=False).table
    np.testing.assert_array_equal(again["predicted_age"], reference["predicted_age"])
    assert not (tmp_path / "no_such_cache").exists()


def test_predict_resumes_and_streams(trained_run, tiny_cohort, tmp_path):
    out = tmp_path / "out"
    first = predict_subjects(trained_run.root, _bids(tiny_cohort), out, progress=False)
    assert first.metrics["n_computed"] == 6
    second = predict_subjects(trained_run.root, _bids(tiny_cohort), out, progress=False)
    assert second.metrics["n_computed"] == 0
    pd.testing.assert_frame_equal(first.table, second.table)
    (out / "subjects" / "sub-0003.json").unlink()  # as if interrupted before this subject
    third = predict_subjects(trained_run.root, _bids(tiny_cohort), out, progress=False)
    assert third.metrics["n_computed"] == 1
    pd.testing.assert_frame_equal(first.table, third.table)


def test_subjects_without_age_are_predicted_without_mae(trained_run, tiny_cohort, tmp_path):
    paths = sorted(tiny_cohort.glob("sub-*/anat/*_T1w.nii.gz"))[:2]
    csv = tmp_path / "new.csv"
    pd.DataFrame({"participant_id": ["sub-a", "sub-b"], "path": [str(p) for p in paths]}).to_csv(
        csv, index=False)
    assert main(["predict", "--run-dir", str(trained_run.root), "--csv", str(csv),
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    table = pd.read_csv(tmp_path / "out" / "predictions.tsv", sep="\t")
    assert table["predicted_age"].notna().all()
    assert table["age"].isna().all() and table["gap"].isna().all()
    assert "mae" not in json.loads((tmp_path / "out" / "metrics.json").read_text())


def test_bad_runs_give_one_clear_error(trained_run, tiny_cohort, tmp_path, capsys):
    bids = str(tiny_cohort)
    copy = _copy_run(trained_run, tmp_path / "run")
    copy.qc_reference.unlink()
    assert main(["predict", "--run-dir", str(copy.root), "--bids", bids,
                 "--out", str(tmp_path / "o1")]) == 1
    message = one_error_line(capsys, "predict")
    assert "qc/reference.npz" in message and "missing" in message

    assert main(["predict", "--run-dir", str(trained_run.root), "--bids", bids,
                 "--out", str(tmp_path / "o2"), "--resolution", "4"]) == 1
    message = one_error_line(capsys, "predict")
    assert "8 mm grid" in message and "4 mm was requested" in message

    assert main(["predict", "--run-dir", str(trained_run.root), "--bids", bids,
                 "--out", str(tmp_path / "o3"), "--maps"]) == 1
    assert "noise_model" in one_error_line(capsys, "predict")

    replaced = _copy_run(trained_run, tmp_path / "retrained")
    torch.save(torch.load(replaced.predictor_checkpoint, weights_only=False) | {"extra": 1},
               replaced.predictor_checkpoint)
    with pytest.raises(BrainAgeInputError, match="changed since index.json"):
        TrainedRun.open(replaced.root)
    (replaced.index_path).unlink()
    with pytest.raises(BrainAgeInputError, match="no index.json"):
        TrainedRun.open(replaced.root)


def test_qc_policies_flag_skip_or_stop(trained_run, tiny_cohort, tmp_path, capsys):
    clean = sorted(tiny_cohort.glob("sub-*/anat/*_T1w.nii.gz"))[0]
    bad = tmp_path / "rotated.nii.gz"
    nib.save(rotated(nib.load(clean)), bad)
    csv = tmp_path / "new.csv"
    pd.DataFrame({"participant_id": ["sub-clean", "sub-rot"], "path": [str(clean), str(bad)],
                  "age": [60.0, 60.0]}).to_csv(csv, index=False)
    manifest = pd.read_csv(csv).assign(sex=None, site="x")
    warn = predict_subjects(trained_run.root, manifest, tmp_path / "w", progress=False).table
    row = warn.set_index("participant_id")
    assert row.loc["sub-clean", "qc_flags"] in ("", None) or pd.isna(row.loc["sub-clean",
                                                                           "qc_flags"])
    assert "registration" in row.loc["sub-rot", "qc_flags"].split(";")
    assert row.loc["sub-rot", "qc_action"] == "flagged"
    assert np.isfinite(row.loc["sub-rot", "predicted_age"])  # flagged, still predicted

    skip = predict_subjects(trained_run.root, manifest, tmp_path / "s", qc="skip",
                            progress=False).table.set_index("participant_id")
    assert skip.loc["sub-rot", "qc_action"] == "skipped"
    assert pd.isna(skip.loc["sub-rot", "predicted_age"])
    assert np.isfinite(skip.loc["sub-clean", "predicted_age"])

    assert main(["predict", "--run-dir", str(trained_run.root), "--csv", str(csv),
                 "--out", str(tmp_path / "r"), "--qc", "raise"]) == 1
    message = one_error_line(capsys, "predict")
    assert "rotated.nii.gz" in message and "sub-rot" in message and "registration" in message


def test_maps_use_the_runs_noise_model(trained_run, tiny_cohort, tmp_path):
    copy = _copy_run(trained_run, tmp_path / "run")
    predictor = load_predictor(copy.predictor_checkpoint)
    trained = TrainedRun.open(copy.root)
    explainer = NoiseMapExplainer(predictor, mask=trained.template.mask, channels=2, depth=1)
    explainer.save(copy.noise_checkpoint)
    manifest = _bids(tiny_cohort).iloc[:2]
    result = predict_subjects(copy.root, manifest, tmp_path / "out", maps=True, progress=False)
    for _, row in result.table.iterrows():
        img = nib.load(tmp_path / "out" / row["map"])
        assert img.shape == trained.template.shape
        assert np.allclose(img.affine, trained.template.affine)
        assert int(img.header["sform_code"]) == 4
        data = img.get_fdata()
        assert data[~trained.template.mask].max() == 0 and data[trained.template.mask].max() > 0


def test_two_torchrun_processes_write_the_table_of_one(trained_run, tiny_cohort, tmp_path):
    # Issue 16: `predict --nproc 2` runs 2 gloo processes under torchrun, each predicting
    # (and mapping) every second subject; rank 0 writes the one table.
    copy = _copy_run(trained_run, tmp_path / "run")
    trained = TrainedRun.open(copy.root)
    NoiseMapExplainer(load_predictor(copy.predictor_checkpoint), mask=trained.template.mask,
                      channels=2, depth=1).save(copy.noise_checkpoint)
    args = ["predict", "--run-dir", str(copy.root), "--bids", str(tiny_cohort), "--maps",
            "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--out", str(tmp_path / "two"), "--nproc", "2"]) == 0
    one, two = (pd.read_csv(tmp_path / d / "predictions.tsv", sep="\t") for d in ("one", "two"))
    assert len(one) == 6 and one["predicted_age"].notna().all()
    pd.testing.assert_frame_equal(one, two, check_exact=False, rtol=0, atol=1e-6)
    for name in one["map"]:
        a, b = (nib.load(tmp_path / d / name).get_fdata() for d in ("one", "two"))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["n_computed"] == 6 and metrics["mae"] == pytest.approx(
        json.loads((tmp_path / "one" / "metrics.json").read_text())["mae"], abs=1e-6)
    assert (tmp_path / "two" / "qc.html").is_file()
