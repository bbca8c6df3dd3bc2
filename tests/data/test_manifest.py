"""Loaders to one manifest (BIDS, CSV, OASIS) and the manifest's bad-input errors."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from helpers.data import make_bids, make_image, t1w_path
from sklearn.utils import Bunch

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data import manifest as mf
from brainage_core.data.sources import bids, oasis
from brainage_core.data.sources import csv as csv_source


# -- BIDS ---------------------------------------------------------------------------------
def test_load_bids_builds_the_manifest(tiny_bids: Path) -> None:
    m = bids.load_bids(tiny_bids)
    assert list(m.columns[:5]) == list(mf.MANIFEST_COLUMNS)
    assert "group" in m.columns  # extra participants.tsv columns are kept
    assert list(m["participant_id"]) == [f"sub-{k:02d}" for k in range(1, 7)]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in m["path"])
    names = [Path(p).name for p in m["path"]]
    assert names == [f"{pid}_T1w.nii.gz" for pid in m["participant_id"]]
    truth = pd.read_csv(tiny_bids / "participants.tsv", sep="\t")
    np.testing.assert_allclose(m["age"], truth["age"])
    # "male" and "F" are normalised to M/F
    assert set(m["sex"]) == {"M", "F"}
    assert m.loc[1, "sex"] == "M" and m.loc[0, "sex"] == "F"
    assert set(m["site"]) == {"tiny"}  # the dataset's Name
    assert m.attrs["metadata"]["source"] == "bids"
    assert mf.validate_manifest(m).shape[0] == 6


def test_load_bids_sessions_and_synthetic_metadata(tmp_path: Path) -> None:
    root = make_bids(tmp_path / "ds", n=3, sessions=True, synthetic_oracle=2.75)
    m = bids.load_bids(root)
    assert list(m["session"]) == ["ses-01"] * 3
    assert all("/ses-01/anat/" in p for p in m["path"])
    meta = m.attrs["metadata"]
    assert meta["source"] == "synthetic"
    assert meta["oracle_mae"] == pytest.approx(2.75)
    assert meta["source_root"] == str(root.resolve())


def test_load_bids_labels_without_prefix(tiny_bids: Path) -> None:
    tsv = tiny_bids / "participants.tsv"
    table = pd.read_csv(tsv, sep="\t")
    table["participant_id"] = table["participant_id"].str.replace("sub-", "")
    table.to_csv(tsv, sep="\t", index=False)
    m = bids.load_bids(tiny_bids)
    assert m["participant_id"].str.startswith("sub-").all()
    assert (m["path"] != "").all()


def test_bids_image_without_participant_row_is_not_listed(tiny_bids: Path) -> None:
    tsv = tiny_bids / "participants.tsv"
    pd.read_csv(tsv, sep="\t").iloc[1:].to_csv(tsv, sep="\t", index=False)
    m = bids.load_bids(tiny_bids)
    with pytest.raises(
        BrainAgeInputError,
        match=r"participant 'sub-01': has an image but is not listed in .*participants\.tsv, "
        r"so it has no age",
    ):
        mf.validate_manifest(m)


def test_bids_participant_without_image(tiny_bids: Path) -> None:
    t1w_path(tiny_bids, "sub-03").unlink()
    m = bids.load_bids(tiny_bids)
    with pytest.raises(BrainAgeInputError, match=r"sub-03.*no image path"):
        mf.validate_manifest(m, "tiny")


def test_bids_without_participants_tsv(tiny_bids: Path) -> None:
    (tiny_bids / "participants.tsv").unlink()
    with pytest.raises(BrainAgeInputError, match="no participants.tsv") as err:
        bids.load_bids(tiny_bids)
    assert str(tiny_bids) in str(err.value)


def test_bids_participants_tsv_without_age(tiny_bids: Path) -> None:
    tsv = tiny_bids / "participants.tsv"
    pd.read_csv(tsv, sep="\t").drop(columns="age").to_csv(tsv, sep="\t", index=False)
    with pytest.raises(BrainAgeInputError, match="missing required column 'age'") as err:
        bids.load_bids(tiny_bids)
    assert "participants.tsv" in str(err.value)


# -- CSV ----------------------------------------------------------------------------------
def _write_csv(tmp_path: Path, n: int = 3, **overrides) -> Path:
    folder = tmp_path / "study"
    (folder / "images").mkdir(parents=True)
    rows = []
    for k in range(n):
        nib.save(make_image(k), folder / "images" / f"s{k}.nii.gz")
        rows.append(
            {
                "participant_id": f"s{k}",
                "path": f"images/s{k}.nii.gz",
                "age": 50.0 + k,
                "sex": "f",
                "scanner": "A",
            }
        )
    table = pd.DataFrame(rows)
    for column, values in overrides.items():
        table[column] = values
    path = folder / "manifest.csv"
    table.to_csv(path, index=False)
    return path


def test_load_csv_resolves_relative_paths(tmp_path: Path, monkeypatch) -> None:
    path = _write_csv(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    m = csv_source.load_csv(path)
    assert list(m["path"]) == [str(path.parent / "images" / f"s{k}.nii.gz") for k in range(3)]
    assert list(m["sex"]) == ["F"] * 3
    assert list(m["site"]) == ["manifest"] * 3  # no site column: the file's name
    assert "scanner" in m.columns
    assert len(mf.validate_manifest(m)) == 3


def test_load_csv_missing_required_column(tmp_path: Path) -> None:
    path = _write_csv(tmp_path)
    pd.read_csv(path).drop(columns="age").to_csv(path, index=False)
    with pytest.raises(BrainAgeInputError, match=r"missing required column\(s\) \['age'\]") as e:
        csv_source.load_csv(path)
    assert str(path) in str(e.value)


def test_validate_manifest_without_required_columns() -> None:
    with pytest.raises(BrainAgeInputError, match=r"my.csv: .*missing .*\['sex', 'site'\]"):
        mf.validate_manifest(
            pd.DataFrame({"participant_id": ["a"], "path": ["x"], "age": [1]}), "my.csv"
        )


@pytest.mark.parametrize(
    ("column", "values", "pattern"),
    [
        ("age", [50.0, "fifty", 52.0], r"'s1': non-numeric age 'fifty'"),
        ("age", [50.0, None, 52.0], r"'s1': missing age"),
        ("participant_id", ["s0", "s0", "s2"], r"'s0': duplicate participant"),
        (
            "path",
            ["images/s0.nii.gz", "images/nope.nii.gz", "images/s2.nii.gz"],
            r"nope.nii.gz: participant 's1': image file does not exist",
        ),
    ],
)
def test_bad_rows_raise_or_are_skipped(tmp_path: Path, column, values, pattern) -> None:
    m = csv_source.load_csv(_write_csv(tmp_path, **{column: values}))
    with pytest.raises(BrainAgeInputError, match=pattern):
        mf.validate_manifest(m, "manifest.csv")
    clean = mf.validate_manifest(m, "manifest.csv", on_error="skip")
    skipped = clean.attrs["skipped"]
    assert len(clean) == 2 and len(skipped) == 1
    assert skipped.loc[0, "participant_id"] in ("s0", "s1")
    assert clean["participant_id"].is_unique
    assert clean["age"].dtype == float


def test_normalise_sex() -> None:
    assert [mf.normalise_sex(v) for v in ["M", "male", " f ", "Female", None, "x", np.nan]] == [
        "M",
        "M",
        "F",
        "F",
        None,
        None,
        None,
    ]


# -- OASIS (never the network) --------------------------------------------------------------
def _fake_oasis(tmp_path: Path) -> Bunch:
    ids = ["OAS1_0001_MR1", "OAS1_0002_MR1", "OAS1_0004_MR1"]
    maps = []
    for k, oid in enumerate(ids):
        folder = tmp_path / "oasis1" / oid
        folder.mkdir(parents=True)
        path = folder / f"mwrc1{oid}_mpr_anon_fslswapdim_bet.nii.gz"
        nib.save(make_image(k), path)
        maps.append(str(path))
    ext = pd.DataFrame(
        {  # CSV order differs from the image order
            "id": ids[::-1],
            "mf": ["F", "M", "F"],
            "age": [74, 55, 23],
            "mmse": [29, 30, None],
            "cdr": [0.5, 0, None],
        }
    )
    return Bunch(gray_matter_maps=maps, white_matter_maps=maps, ext_vars=ext)


def test_oasis_bunch_to_manifest(tmp_path: Path) -> None:
    m = oasis.oasis_to_manifest(_fake_oasis(tmp_path))
    assert list(m["participant_id"]) == ["OAS1_0001_MR1", "OAS1_0002_MR1", "OAS1_0004_MR1"]
    assert list(m["age"]) == [23, 55, 74]
    assert list(m["sex"]) == ["F", "M", "F"]
    assert set(m["site"]) == {"OASIS-1"}
    assert {"mmse", "cdr"} <= set(m.columns)
    assert m.attrs["metadata"]["source"] == "oasis"
    assert len(mf.validate_manifest(m)) == 3


def test_fetch_oasis_uses_nilearn_and_converts(tmp_path: Path, monkeypatch) -> None:
    bunch = _fake_oasis(tmp_path)
    calls = {}

    def fake_fetch(n_subjects=None, data_dir=None, verbose=0):
        calls.update(n_subjects=n_subjects, data_dir=data_dir)
        return bunch

    monkeypatch.setattr("nilearn.datasets.fetch_oasis_vbm", fake_fetch)
    m = oasis.fetch_oasis(data_dir=tmp_path, n_subjects=3, timeout=10)
    assert calls == {"n_subjects": 3, "data_dir": tmp_path}
    assert len(m) == 3


def test_fetch_oasis_times_out(monkeypatch) -> None:
    monkeypatch.setattr("nilearn.datasets.fetch_oasis_vbm", lambda **kw: time.sleep(3))
    start = time.monotonic()
    with pytest.raises(BrainAgeInputError, match=r"did not finish within 0.2 s"):
        oasis.fetch_oasis(timeout=0.2)
    assert time.monotonic() - start < 2


def test_fetch_oasis_network_error_is_clear(monkeypatch, tmp_path: Path) -> None:
    def offline(**kw):
        raise OSError("Name or service not known")

    monkeypatch.setattr("nilearn.datasets.fetch_oasis_vbm", offline)
    with pytest.raises(BrainAgeInputError, match="fetching OASIS VBM failed: Name or service"):
        oasis.fetch_oasis(data_dir=tmp_path)
