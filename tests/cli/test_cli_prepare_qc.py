"""``prepare --qc``: each image is read once, and shards measure only their own rows."""

from __future__ import annotations

import collections
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from helpers.qc import with_skull

from brainage_core.cli import main
from brainage_core.data import qc
from brainage_core.data.qc import cohort_qc
from brainage_core.data.sources.csv import load_csv
from brainage_core.data.template import load_template

MEASURES = ["ncc", "coverage", "outside_ratio", "intensity_distance", "voxel_size"]


def _manifest(cohort: Path, tmp_path: Path) -> Path:
    """The tiny cohort's 6 subjects and one image with its skull on (flagged)."""
    table = pd.read_csv(cohort / "participants.tsv", sep="\t")
    rows = [{"participant_id": pid, "path": str(cohort / pid / "anat" / f"{pid}_T1w.nii.gz"),
             "age": age, "sex": sex, "site": "s"}
            for pid, age, sex in zip(table["participant_id"], table["age"], table["sex"],
                                     strict=True)]
    skull = tmp_path / "skull.nii.gz"
    nib.save(with_skull(nib.load(rows[0]["path"])), skull)
    rows.insert(3, {**rows[0], "participant_id": "sub-skull", "path": str(skull)})
    path = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _counting(monkeypatch) -> collections.Counter:
    reads: collections.Counter = collections.Counter()
    real = qc.load_image

    def load_image(img, *args, **kwargs):
        reads[str(img)] += 1
        return real(img, *args, **kwargs)

    monkeypatch.setattr(qc, "load_image", load_image)
    return reads


def _prepare(manifest: Path, out: Path, *extra: str) -> int:
    return main(["prepare", "--csv", str(manifest), "--out", str(out), "--resolution", "8",
                 "--n-jobs", "1", "--no-progress", "--qc", "skip", *extra])


def _qc_table(out: Path) -> tuple[Path, pd.DataFrame]:
    (folder,) = out.glob("*.qc")
    return folder.with_suffix(""), pd.read_csv(folder / "qc.tsv", sep="\t")


def test_prepare_reads_each_image_once_and_shards_give_the_same_result(
        tiny_cohort, tmp_path, monkeypatch):
    manifest = _manifest(tiny_cohort, tmp_path)
    paths = load_csv(manifest)["path"].astype(str).tolist()
    reads = _counting(monkeypatch)
    assert _prepare(manifest, tmp_path / "one") == 0
    root, table = _qc_table(tmp_path / "one")
    flagged = table.loc[~table["qc_pass"], "participant_id"].tolist()
    assert flagged == ["sub-skull"]  # and left out of the cohort, without being read again
    assert "sub-skull" not in pd.read_csv(root / "table.tsv", sep="\t")["participant_id"].tolist()
    searched = set(table.loc[table["pose_fix"].notna(), "path"]) if "pose_fix" in table else set()
    for path in paths:
        assert reads[path] == 1 or path in searched, (path, reads[path])

    # the measures taken while preparing are those of the separate QC pass
    separate = cohort_qc(load_csv(manifest), load_template(8), progress=False)
    pd.testing.assert_frame_equal(table[["participant_id", *MEASURES, "qc_flags"]].fillna(""),
                                  separate[["participant_id", *MEASURES, "qc_flags"]].fillna(""),
                                  check_dtype=False, rtol=1e-12)

    # two shards: each reads its own rows only; together they publish the same cohort
    reads.clear()
    assert _prepare(manifest, tmp_path / "two", "--shard", "1", "2") == 0
    assert set(reads) == set(paths[1::2]), sorted(reads)
    assert not list((tmp_path / "two").glob("*.qc"))  # not published yet
    reads.clear()
    assert _prepare(manifest, tmp_path / "two", "--shard", "0", "2") == 0
    assert set(reads) - searched == set(paths[0::2]), sorted(reads)
    root2, table2 = _qc_table(tmp_path / "two")
    assert root2.name == root.name
    pd.testing.assert_frame_equal(table, table2)
    for name in ("images.npy", "table.tsv", "skipped.tsv"):
        assert (root / name).read_bytes() == (root2 / name).read_bytes(), name
    images = np.load(root / "images.npy")
    assert images.shape[0] == len(paths) - 1


def test_the_cache_keeps_the_measures_of_the_images_it_read(tmp_path):
    from helpers.data import make_bids, t1w_path, truncate_gzip

    from brainage_core.data.cache import prepare_cohort
    from brainage_core.data.sources.bids import load_bids

    root = make_bids(tmp_path / "ds", n=5)
    truncate_gzip(t1w_path(root, "sub-02"))
    kw = {"resolution": 8, "on_error": "skip", "progress": False, "n_jobs": 1}
    cohort = prepare_cohort(load_bids(root), tmp_path / "c", qc=True, **kw)
    measured = cohort.qc_measures()
    assert sorted(measured) == sorted(cohort.table["path"])  # not the unreadable one
    one = qc.preprocess_with_qc(cohort.table["path"][0], load_template(8))
    got = measured[cohort.table["path"][0]]
    assert got["measures"] == one.measures
    np.testing.assert_array_equal(got["profile"],
                                  qc.intensity_percentiles(one.image, load_template(8).mask))
    # the same images as without QC: the measures are not part of the key
    plain = prepare_cohort(load_bids(root), tmp_path / "c2", **kw)
    assert plain.root.name == cohort.root.name and plain.qc_measures() == {}
    assert (plain.root / "images.npy").read_bytes() == (cohort.root / "images.npy").read_bytes()
