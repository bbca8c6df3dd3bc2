"""BIDS through pybids: sessions and runs, per-session ages, grouped splits, the index database."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from helpers.data import make_image, make_longitudinal_bids

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data import manifest as mf
from brainage_core.data.cache import prepare_cohort
from brainage_core.data.cohort import load_cohort, resolve_data_config
from brainage_core.data.sources import bids as bs
from brainage_core.data.splits import make_splits


@pytest.fixture
def longitudinal(tmp_path: Path) -> Path:
    """2 subjects x 2 sessions, ages in sessions.tsv (2.5 years apart)."""
    return make_longitudinal_bids(tmp_path / "long", n=2)


def test_all_sessions_are_rows_keyed_by_subject_and_session(longitudinal: Path) -> None:
    m = bs.load_bids(longitudinal, session="all")
    assert list(zip(m["participant_id"], m["session"], strict=True)) == [
        ("sub-01", "ses-01"), ("sub-01", "ses-02"), ("sub-02", "ses-01"), ("sub-02", "ses-02")]
    # the age of each session comes from sessions.tsv, not the baseline of participants.tsv
    np.testing.assert_allclose(m["age"], [50.0, 52.5, 57.0, 59.5])
    assert set(m["age_source"]) == {"sessions.tsv"}
    assert [Path(p).name for p in m["path"]] == [
        "sub-01_ses-01_T1w.nii.gz", "sub-01_ses-02_T1w.nii.gz",
        "sub-02_ses-01_T1w.nii.gz", "sub-02_ses-02_T1w.nii.gz"]
    assert mf.image_labels(m) == ["sub-01_ses-01", "sub-01_ses-02", "sub-02_ses-01",
                                  "sub-02_ses-02"]
    clean = mf.validate_manifest(m)  # a subject twice is fine, one session twice is not
    assert len(clean) == 4
    assert m.attrs["metadata"]["bids_selection"] == {"session": "all", "run": "first"}


@pytest.mark.parametrize(("rule", "expected"), [
    ("first", ["ses-01", "ses-01"]), ("last", ["ses-02", "ses-02"]),
    ("02", ["ses-02", "ses-02"]), ("ses-01", ["ses-01", "ses-01"])])
def test_one_session_per_subject(longitudinal: Path, rule: str, expected: list[str]) -> None:
    m = bs.load_bids(longitudinal, session=rule)
    assert list(m["participant_id"]) == ["sub-01", "sub-02"]
    assert list(m["session"]) == expected
    ages = {"ses-01": [50.0, 57.0], "ses-02": [52.5, 59.5]}[expected[0]]
    np.testing.assert_allclose(m["age"], ages)


def test_a_missing_session_label_is_reported_as_no_image(longitudinal: Path) -> None:
    m = bs.load_bids(longitudinal, session="03")
    assert list(m["path"]) == ["", ""]
    with pytest.raises(BrainAgeInputError, match=r"sub-01.*no image path"):
        mf.validate_manifest(m)


def test_natural_session_order_and_runs(tmp_path: Path) -> None:
    root = make_longitudinal_bids(tmp_path / "ds", n=1, sessions=("2", "10"))
    anat = root / "sub-01" / "ses-2" / "anat"
    (anat / "sub-01_ses-2_T1w.nii.gz").unlink()
    for r in (1, 2):
        nib.save(make_image(40 + r), anat / f"sub-01_ses-2_run-{r}_T1w.nii.gz")
    first = bs.load_bids(root)  # ses-2 comes before ses-10; run 1 before run 2
    assert (first.at[0, "session"], first.at[0, "run"]) == ("ses-2", 1)
    last_run = bs.load_bids(root, run="last")
    assert (last_run.at[0, "session"], last_run.at[0, "run"]) == ("ses-2", 2)
    every = bs.load_bids(root, session="all", run="all")
    assert mf.image_labels(every) == ["sub-01_ses-2_run-1", "sub-01_ses-2_run-2", "sub-01_ses-10"]
    assert len(mf.validate_manifest(every)) == 3


def test_participants_age_without_sessions_tsv(tmp_path: Path) -> None:
    root = make_longitudinal_bids(tmp_path / "ds", n=2, sessions_tsv=False)
    m = bs.load_bids(root, session="all")
    np.testing.assert_allclose(m["age"], [50.0, 50.0, 57.0, 57.0])
    assert set(m["age_source"]) == {"participants.tsv"}


def test_bad_sessions_tsv_names_the_file(longitudinal: Path) -> None:
    path = longitudinal / "sub-02" / "sub-02_sessions.tsv"
    pd.DataFrame({"session": ["ses-01"], "age": [3]}).to_csv(path, sep="\t", index=False)
    with pytest.raises(BrainAgeInputError, match="missing required column 'session_id'") as err:
        bs.load_bids(longitudinal, session="all")
    assert "sub-02_sessions.tsv" in str(err.value)
    pd.DataFrame({"session_id": ["ses-01"], "age": ["old"]}).to_csv(path, sep="\t", index=False)
    with pytest.raises(BrainAgeInputError, match="non-numeric age 'old'") as err:
        bs.load_bids(longitudinal, session="all")
    assert "sub-02_sessions.tsv" in str(err.value)


@pytest.mark.parametrize("value", ["", "ses_1", True, None, 1.5])
def test_bad_selection_rule(value) -> None:
    with pytest.raises(BrainAgeInputError, match="data.bids.session"):
        bs.BidsSelection(session=value)
    with pytest.raises(BrainAgeInputError, match=r"unknown key\(s\).*'data.bids'"):
        bs.BidsSelection.from_dict({"sessions": "all"})
    if value is None:  # in a config, None means the default
        cfg = resolve_data_config({"source": "bids", "path": "x", "bids": {"session": value}})
        assert cfg["bids"] == {"session": "first", "run": "first"}
    else:
        with pytest.raises(BrainAgeInputError, match="data.bids.session"):
            resolve_data_config({"source": "bids", "path": "x", "bids": {"session": value}})


def test_splits_keep_each_subject_in_one_split(tmp_path: Path) -> None:
    # the 2 x 2 fixture, and a larger one where the splits have more than one subject
    for n in (2, 8):
        root = make_longitudinal_bids(tmp_path / f"ds{n}", n=n, sessions=("01", "02", "03"))
        manifest = bs.load_bids(root, session="all")
        cohort = prepare_cohort(manifest, tmp_path / f"cache{n}", resolution=8,
                                split_fractions=(0.5, 0.25, 0.25), n_jobs=1, progress=False)
        table = cohort.table
        assert len(table) == 3 * n
        per_subject = table.groupby("participant_id")["split"].nunique()
        assert (per_subject == 1).all(), table[["participant_id", "session", "split"]]
        if n == 8:
            assert set(table["split"]) == {"train", "val", "test"}
            assert (table["split"] == "train").sum() == 3 * 4  # 4 of 8 subjects, 3 rows each


def test_the_config_section_data_bids_reaches_the_loader(longitudinal: Path,
                                                         tmp_path: Path) -> None:
    data = {"source": "bids", "path": str(longitudinal), "resolution": 8,
            "cache_dir": str(tmp_path / "cache"), "split_fractions": [0.5, 0.5, 0.0]}
    every = load_cohort({**data, "bids": {"session": "all"}}, progress=False, n_jobs=1)
    assert mf.image_labels(every.table) == ["sub-01_ses-01", "sub-01_ses-02", "sub-02_ses-01",
                                            "sub-02_ses-02"]
    assert (every.table.groupby("participant_id")["split"].nunique() == 1).all()
    last = load_cohort({**data, "bids": {"session": "last"}}, progress=False, n_jobs=1)
    assert list(last.table["session"]) == ["ses-02", "ses-02"]
    np.testing.assert_allclose(last.table["age"], [52.5, 59.5])
    assert list((tmp_path / "cache" / "bids_index").glob("*/layout_index.sqlite"))


def test_grouped_splits_equal_plain_splits_with_one_row_per_group() -> None:
    ages = np.random.default_rng(0).uniform(20, 80, 50)
    groups = [f"sub-{k}" for k in range(50)]
    assert list(make_splits(ages, seed=3, groups=groups)) == list(make_splits(ages, seed=3))
    with pytest.raises(BrainAgeInputError, match="one group per age"):
        make_splits(ages, groups=groups[:-1])


def test_index_database_is_reused_until_the_dataset_changes(longitudinal: Path,
                                                            tmp_path: Path) -> None:
    db = tmp_path / "index"
    first = bs.index_t1w(longitudinal, database_dir=db)
    databases = list(db.glob("*/layout_index.sqlite"))
    assert len(databases) == 1
    again = bs.index_t1w(longitudinal, database_dir=db)
    pd.testing.assert_frame_equal(first, again)
    assert list(db.glob("*/layout_index.sqlite")) == databases  # reused, not rebuilt
    # a new image: a new fingerprint, a new index that sees it
    anat = longitudinal / "sub-02" / "ses-03" / "anat"
    anat.mkdir(parents=True)
    nib.save(make_image(9), anat / "sub-02_ses-03_T1w.nii.gz")
    changed = bs.index_t1w(longitudinal, database_dir=db)
    assert len(changed) == len(first) + 1
    assert len(list(db.glob("*/layout_index.sqlite"))) == 2


def test_only_anatomical_files_are_indexed(longitudinal: Path) -> None:
    func = longitudinal / "sub-01" / "ses-01" / "func"
    func.mkdir()
    nib.save(make_image(5), func / "sub-01_ses-01_task-rest_bold.nii.gz")
    nib.save(make_image(6), func / "sub-01_ses-01_T1w.nii.gz")  # misplaced: not an anat file
    table = bs.index_t1w(longitudinal)
    assert len(table) == 4
    assert not any("/func/" in p for p in table["path"])


def test_validator_summary(longitudinal: Path) -> None:
    (longitudinal / "sub-01" / "notes.txt").write_text("not BIDS")
    m = bs.load_bids(longitudinal, validate=True)
    summary = m.attrs["metadata"]["bids_validation"]
    assert summary["tool"]
    if summary["tool"].startswith("bids_validator"):  # the Python file-name validator
        assert summary["n_errors"] == 1
        assert summary["issues"] == ["not a BIDS file name: /sub-01/notes.txt"]
