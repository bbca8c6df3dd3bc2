"""The prepared-cohort cache: layout, reuse, interruption, bad inputs, load_cohort."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from helpers.data import (
    RES,
    make_bids,
    make_image,
    save_with_raw_affine,
    t1w_path,
    truncate_gzip,
)

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data import cache as cache_mod
from brainage_core.data.cache import CACHE_FORMAT_VERSION, PreparedCohort, prepare_cohort
from brainage_core.data.cohort import load_cohort
from brainage_core.data.preprocess import preprocess_image
from brainage_core.data.sources.bids import load_bids
from brainage_core.data.template import load_template


def _prepare(root: Path, cache: Path, **kw) -> PreparedCohort:
    kw.setdefault("n_jobs", 1)
    return prepare_cohort(load_bids(root), cache, resolution=RES, progress=False, **kw)


@pytest.fixture
def counter(monkeypatch):
    """Count the images computed (in-process path)."""
    calls: list[int] = []
    original = cache_mod._prepare_one

    def counting(index, path, resolution, *rest):
        calls.append(index)
        return original(index, path, resolution, *rest)

    monkeypatch.setattr(cache_mod, "_prepare_one", counting)
    return calls


def test_prepared_cohort_layout(tmp_path: Path) -> None:
    root = make_bids(tmp_path / "ds", n=8, synthetic_oracle=2.5)
    cohort = _prepare(root, tmp_path / "cache")
    tpl = load_template(RES)
    assert len(cohort) == 8
    assert cohort.images.shape == (8, *tpl.shape) and cohort.images.dtype == np.float16
    assert not cohort.images.flags.writeable
    np.testing.assert_array_equal(cohort.mask, tpl.mask)
    np.testing.assert_allclose(cohort.affine, tpl.affine)
    assert cohort.resolution == RES and cohort.shape == tpl.shape
    assert list(cohort.table.columns[:5]) == ["participant_id", "path", "age", "sex", "site"]
    assert {"group", "split"} <= set(cohort.table.columns)
    assert cohort.metadata["oracle_mae"] == pytest.approx(2.5)
    assert cohort.metadata["source_root"] == str(root.resolve())
    assert cohort.metadata["source"] == "synthetic"
    # arrays are the preprocessed images, in table order
    for i in (0, 5):
        expected = preprocess_image(cohort.table.loc[i, "path"], tpl)
        np.testing.assert_allclose(cohort.image(i), expected, atol=2e-3)
    # splits partition the cohort and are stored with it
    idx = np.concatenate([cohort.indices(s) for s in ("train", "val", "test")])
    assert sorted(idx.tolist()) == list(range(8))
    assert len(cohort.indices("val")) >= 1 and len(cohort.indices("test")) >= 1
    saved = pd.read_csv(cohort.root / "table.tsv", sep="\t")
    assert list(saved["split"]) == list(cohort.table["split"])
    img = cohort.to_image(cohort.image(0))
    np.testing.assert_allclose(img.affine, tpl.affine)
    assert cohort.skipped.empty
    train = cohort.indices("train")
    np.testing.assert_allclose(
        cohort.mean_image("train"), np.mean([cohort.image(i) for i in train], axis=0), atol=1e-5
    )
    with pytest.raises(BrainAgeInputError, match="'split' must be one of"):
        cohort.indices("training")


def test_second_prepare_reuses_the_cache(tiny_bids: Path, tmp_path: Path, counter) -> None:
    first = _prepare(tiny_bids, tmp_path / "cache")
    assert sorted(counter) == list(range(6))
    mtime = (first.root / "images.npy").stat().st_mtime_ns
    second = _prepare(tiny_bids, tmp_path / "cache")
    assert len(counter) == 6  # no image computed again
    assert second.root == first.root
    assert (second.root / "images.npy").stat().st_mtime_ns == mtime


def test_changed_inputs_or_parameters_give_a_new_cache(tiny_bids: Path, tmp_path: Path) -> None:
    first = _prepare(tiny_bids, tmp_path / "cache")
    path = t1w_path(tiny_bids, "sub-02")
    nib.save(make_image(99), path)  # new content, new size/mtime
    os.utime(path, ns=(1, 1))
    second = _prepare(tiny_bids, tmp_path / "cache")
    assert second.root != first.root
    assert not np.allclose(second.image(1), first.image(1))
    np.testing.assert_array_equal(second.image(0), first.image(0))
    third = _prepare(tiny_bids, tmp_path / "cache", split_fractions=(0.5, 0.25, 0.25))
    assert third.root not in (first.root, second.root)


def test_interrupted_prepare_is_not_trusted_and_resumes(
    tiny_bids: Path, tmp_path: Path, monkeypatch
) -> None:
    cache = tmp_path / "cache"
    original = cache_mod._prepare_one
    calls: list[int] = []

    def interrupted(index, path, resolution, *rest):
        calls.append(index)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(index, path, resolution, *rest)

    monkeypatch.setattr(cache_mod, "FLUSH_EVERY", 1)
    monkeypatch.setattr(cache_mod, "_prepare_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _prepare(tiny_bids, cache)
    folders = [p for p in cache.iterdir() if p.is_dir()]
    assert len(folders) == 1 and folders[0].name.endswith(".partial")
    with pytest.raises(BrainAgeInputError, match="unfinished cache"):
        PreparedCohort.open(folders[0])
    with pytest.raises(BrainAgeInputError, match="does not exist"):
        PreparedCohort.open(folders[0].with_suffix(""))

    calls.clear()
    resumed = _prepare(tiny_bids, cache)
    assert sorted(calls) == [3, 4, 5]  # the three images done before are not redone
    assert not folders[0].exists()
    monkeypatch.setattr(cache_mod, "_prepare_one", original)
    fresh = _prepare(tiny_bids, tmp_path / "fresh")
    np.testing.assert_array_equal(np.asarray(resumed.images), np.asarray(fresh.images))


def _break(root: Path, pid: str, kind: str) -> None:
    path = t1w_path(root, pid)
    img = make_image(7)
    data = np.asarray(img.dataobj)
    if kind == "truncated":
        truncate_gzip(path)
    elif kind == "volumes":
        nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), img.affine), path)
    elif kind == "nan":
        data = data.copy()
        data[0, 0, 0] = np.nan
        nib.save(nib.Nifti1Image(data, img.affine), path)
    elif kind == "affine":
        save_with_raw_affine(path, data, np.diag([8.0, 0.0, 8.0, 1.0]))
    elif kind == "missing":
        path.unlink()


BAD_IMAGES = {
    "truncated": "truncated or corrupt",
    "volumes": "4D image with 2 volumes",
    "nan": "non-finite voxel",
    "affine": "degenerate affine",
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_image_raises_naming_participant_and_file(tiny_bids: Path, tmp_path: Path, kind):
    _break(tiny_bids, "sub-03", kind)
    with pytest.raises(BrainAgeInputError, match=BAD_IMAGES[kind]) as err:
        _prepare(tiny_bids, tmp_path / "cache")
    message = str(err.value)
    assert "sub-03" in message and "sub-03_T1w.nii.gz" in message
    assert not [
        p for p in (tmp_path / "cache").iterdir() if not p.name.endswith((".partial", ".lock"))
    ]


def test_skip_policy_lists_every_bad_participant(tiny_bids: Path, tmp_path: Path) -> None:
    root = make_bids(tmp_path / "ds", n=9)
    for pid, kind in zip(["sub-02", "sub-04", "sub-06", "sub-07"], sorted(BAD_IMAGES), strict=True):
        _break(root, pid, kind)
    _break(root, "sub-08", "missing")
    tsv = root / "participants.tsv"
    table = pd.read_csv(tsv, sep="\t", dtype={"age": str})
    table.loc[table.participant_id == "sub-09", "age"] = "old"
    table.to_csv(tsv, sep="\t", index=False)

    cohort = _prepare(root, tmp_path / "cache", on_error="skip")
    assert list(cohort.table["participant_id"]) == ["sub-01", "sub-03", "sub-05"]
    assert cohort.images.shape[0] == 3
    tpl = load_template(RES)
    np.testing.assert_allclose(
        cohort.image(1), preprocess_image(t1w_path(root, "sub-03"), tpl), atol=2e-3
    )
    skipped = cohort.skipped.set_index("participant_id")["reason"]
    assert sorted(skipped.index) == ["sub-02", "sub-04", "sub-06", "sub-07", "sub-08", "sub-09"]
    assert "non-numeric age" in skipped["sub-09"]
    assert "no image path" in skipped["sub-08"]
    for pid, kind in zip(["sub-02", "sub-04", "sub-06", "sub-07"], sorted(BAD_IMAGES), strict=True):
        assert BAD_IMAGES[kind] in skipped[pid]
    assert cohort.metadata["n_skipped"] == 6
    assert (cohort.root / "skipped.tsv").is_file()


def test_workers_give_the_same_cache_as_in_process(tmp_path: Path) -> None:
    root = make_bids(tmp_path / "ds", n=cache_mod.MIN_IMAGES_FOR_WORKERS)
    one = _prepare(root, tmp_path / "c1", n_jobs=1)
    two = _prepare(root, tmp_path / "c2", n_jobs=2)
    np.testing.assert_array_equal(np.asarray(one.images), np.asarray(two.images))
    pd.testing.assert_frame_equal(one.table, two.table)


def test_open_rejects_broken_folders(tiny_bids: Path, tmp_path: Path) -> None:
    cohort = _prepare(tiny_bids, tmp_path / "cache")
    with pytest.raises(BrainAgeInputError, match="no metadata.json"):
        PreparedCohort.open(tmp_path)
    meta_path = cohort.root / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = CACHE_FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BrainAgeInputError, match="cache format version"):
        PreparedCohort.open(cohort.root)
    meta["format_version"] = CACHE_FORMAT_VERSION
    meta["n_subjects"] = 7
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BrainAgeInputError, match="images.npy holds"):
        PreparedCohort.open(cohort.root)


def test_bad_parameters(tiny_bids: Path, tmp_path: Path) -> None:
    m = load_bids(tiny_bids)
    with pytest.raises(BrainAgeInputError, match="'resolution' must be one of"):
        prepare_cohort(m, tmp_path, resolution=5)
    with pytest.raises(BrainAgeInputError, match="'on_error' must be one of"):
        prepare_cohort(m, tmp_path, on_error="ignore")
    with pytest.raises(BrainAgeInputError, match="duplicate participant 'sub-01'"):
        prepare_cohort(pd.concat([m, m.iloc[:1]]), tmp_path, resolution=RES)


# -- study.load_cohort -------------------------------------------------------------------------
def test_load_cohort_from_bids_and_csv(tiny_bids: Path, tmp_path: Path, counter) -> None:
    data = {
        "source": "bids",
        "path": str(tiny_bids),
        "resolution": RES,
        "cache_dir": str(tmp_path / "cache"),
        "split_fractions": [0.5, 0.25, 0.25],
    }
    cohort = load_cohort(data, progress=False, n_jobs=1)
    assert len(cohort) == 6 and cohort.root.parent == tmp_path / "cache" / "prepared"
    assert cohort.metadata["split_fractions"] == [0.5, 0.25, 0.25]
    again = load_cohort(data, progress=False, n_jobs=1)
    assert again.root == cohort.root and len(counter) == 6

    csv = tmp_path / "manifest.csv"
    table = load_bids(tiny_bids)
    table.to_csv(csv, index=False)
    from_csv = load_cohort({**data, "source": "csv", "path": str(csv)}, progress=False, n_jobs=1)
    np.testing.assert_array_equal(np.asarray(from_csv.images), np.asarray(cohort.images))


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"source": "bids", "resolution": RES, "colour": 1}, r"unknown key\(s\).*'colour'"),
        ({"source": "dicom"}, "'data.source' must be one of"),
        ({"source": "bids"}, "'data.path' is required"),
        ({"source": "csv", "path": "x.csv", "resolution": 5}, "'data.resolution' must be"),
        ({"source": "bids", "path": "x", "on_error": "warn"}, "'data.on_error' must be"),
        ({"data": {"source": "bids"}}, "takes the 'data' section"),
    ],
)
def test_load_cohort_validates_the_data_section(data, pattern) -> None:
    with pytest.raises(BrainAgeInputError, match=pattern):
        load_cohort(data, progress=False)


def test_load_cohort_synthetic_generates_once(tmp_path: Path, monkeypatch) -> None:
    from brainage_core.data import synth
    calls = []
    original = synth.generate_cohort

    def counting(config, out, **kw):
        calls.append(Path(out))
        return original(config, out, **kw)

    monkeypatch.setattr(synth, "generate_cohort", counting)
    data = {"source": "synthetic", "resolution": RES, "cache_dir": str(tmp_path / "cache"),
            "synthetic": {"n_subjects": 5, "resolution": 4, "seed": 2}}  # fmt: skip
    cohort = load_cohort(data, progress=False, n_jobs=1)
    assert len(calls) == 1 and calls[0].name.endswith(".partial")
    source_root = Path(cohort.metadata["source_root"])
    assert source_root.parent == tmp_path / "cache" / "synthetic"
    assert not calls[0].exists()  # moved into place once complete
    assert (source_root / "derivatives" / "ground_truth").is_dir()
    assert cohort.metadata["oracle_mae"] > 0 and len(cohort) == 5
    assert cohort.resolution == RES
    again = load_cohort(data, progress=False, n_jobs=1)
    assert len(calls) == 1 and again.root == cohort.root
    other = load_cohort({**data, "synthetic": {**data["synthetic"], "seed": 3}},
                        progress=False, n_jobs=1)  # fmt: skip
    assert len(calls) == 2 and other.root != cohort.root


def test_image_writer_resumes_only_a_matching_file(tmp_path: Path) -> None:
    path = tmp_path / "images.npy"
    writer = cache_mod.ImageFileWriter.create(path, (3, 4, 5, 6))
    writer.write(1, np.full((4, 5, 6), 2.5))
    writer.close()
    np.testing.assert_array_equal(np.load(path)[1], np.full((4, 5, 6), 2.5, np.float16))
    assert np.load(path)[0].max() == 0
    resumed = cache_mod.ImageFileWriter.resume(path, (3, 4, 5, 6))
    assert resumed is not None
    resumed.close()
    assert cache_mod.ImageFileWriter.resume(path, (4, 4, 5, 6)) is None
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    assert cache_mod.ImageFileWriter.resume(path, (3, 4, 5, 6)) is None
