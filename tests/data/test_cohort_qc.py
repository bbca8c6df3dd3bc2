"""Notebook 01's path: the cohort is prepared and QC'd with each image read once."""

from __future__ import annotations

import collections

import pandas as pd

from brainage_core.data import preprocess, qc
from brainage_core.data.cohort import cohort_quality, load_cohort
from brainage_core.data.qc import cohort_qc

MEASURES = ["ncc", "coverage", "outside_ratio", "intensity_distance", "voxel_size"]


def _counting(monkeypatch) -> collections.Counter:
    """Count every image read, by preparation (``preprocess``) and by QC (``qc``)."""
    reads: collections.Counter = collections.Counter()
    for module in (preprocess, qc):
        real = module.load_image

        def load_image(img, *args, _real=real, **kwargs):
            reads[str(img)] += 1
            return _real(img, *args, **kwargs)

        monkeypatch.setattr(module, "load_image", load_image)
    return reads


def test_notebook_01_reads_each_image_once(tiny_cohort, tmp_path, monkeypatch):
    data = {"source": "bids", "path": str(tiny_cohort), "resolution": 8,
            "cache_dir": str(tmp_path / "cache")}
    reads = _counting(monkeypatch)
    cohort = load_cohort(data, progress=False, n_jobs=1, qc=True)
    table = cohort_quality(cohort, data, progress=False)
    paths = [str(p) for p in cohort.table["path"]]
    assert len(paths) == 6 and list(table["path"].astype(str)) == paths
    searched = set(table.loc[table["pose_fix"].notna(), "path"]) if "pose_fix" in table else set()
    for path in paths:  # once, or again only for a flagged image's pose search
        assert reads[path] == 1 or path in searched, (path, reads[path])
    # the same table as a QC pass that reads every image itself
    reads.clear()
    separate = cohort_qc(cohort.table, cohort.template, progress=False)
    assert set(reads) == set(paths)
    columns = ["participant_id", *MEASURES, "qc_pass", "qc_flags"]
    pd.testing.assert_frame_equal(table[columns].fillna(""), separate[columns].fillna(""),
                                  check_dtype=False, rtol=1e-12)


def test_a_cache_prepared_without_measures_is_measured_by_the_qc(tiny_cohort, tmp_path,
                                                                 monkeypatch):
    data = {"source": "bids", "path": str(tiny_cohort), "resolution": 8,
            "cache_dir": str(tmp_path / "cache")}
    cohort = load_cohort(data, progress=False, n_jobs=1)  # before the notebook asked for QC
    assert cohort.qc_measures() == {}
    reads = _counting(monkeypatch)
    again = load_cohort(data, progress=False, n_jobs=1, qc=True)  # the ready cache, as is
    assert again.root == cohort.root and not reads
    table = cohort_quality(again, data, progress=False)
    assert set(reads) == {str(p) for p in cohort.table["path"]}
    assert len(table) == 6 and table["ncc"].notna().all()
