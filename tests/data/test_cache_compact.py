"""A skipped subject never rewrites the array: each image written once into its final row
(issue 16); an earlier version's unfinished partial is compacted in place, resumably."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers.data import RES, make_bids, t1w_path, truncate_gzip

from brainage_core.data import cache as cache_mod
from brainage_core.data.sources.bids import load_bids
from brainage_core.data.template import load_template

KEEPS = {
    "first dropped": [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "last dropped": [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
    "one in the middle": [1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
    "several": [1, 0, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1],
    "alternating": [0, 1] * 6,
}


class Cut(Exception):
    """Stands for a kill in the middle of the compaction."""


def _array_file(path: Path, images: np.ndarray) -> bytes:
    writer = cache_mod.ImageFileWriter.create(path, images.shape)
    for i, image in enumerate(images):
        writer.write(i, image)
    writer.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(12, 3, 4, 5)).astype(np.float16)


@pytest.mark.parametrize("name", sorted(KEEPS))
def test_compaction_in_place_gives_the_file_of_the_kept_rows(name, images, tmp_path):
    keep = np.array(KEEPS[name], dtype=bool)
    expected = _array_file(tmp_path / "expected.npy", images[keep])
    path = tmp_path / "images.npy"
    _array_file(path, images)
    cache_mod.compact_in_place(path, keep, tmp_path / "compact.json")
    assert path.read_bytes() == expected  # header, rows and size: byte for byte
    np.testing.assert_array_equal(np.load(path), images[keep])


def test_a_compaction_cut_at_any_write_resumes_to_the_same_file(images, tmp_path, monkeypatch):
    # Every possible cut: after 0, 1, 2, ... row writes (batches of up to 3 rows, so cuts
    # land inside batches and between them), then a second call finishes the work.
    monkeypatch.setattr(cache_mod, "COMPACT_BATCH", 3)
    keep = np.array(KEEPS["several"], dtype=bool)
    expected = _array_file(tmp_path / "expected.npy", images[keep])
    original = tmp_path / "original.npy"
    _array_file(original, images)
    real_pwrite = cache_mod.os.pwrite
    n_writes = 0
    for cut in range(20):
        path, record = tmp_path / "images.npy", tmp_path / "compact.json"
        shutil.copy(original, path)
        record.unlink(missing_ok=True)
        calls = [0]

        def failing(fd, data, offset, calls=calls, cut=cut):
            if calls[0] == cut:
                raise Cut
            calls[0] += 1
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(cache_mod.os, "pwrite", failing)
        try:
            cache_mod.compact_in_place(path, keep, record)
            finished = True
        except Cut:
            finished = False
        monkeypatch.setattr(cache_mod.os, "pwrite", real_pwrite)
        if not finished:
            cache_mod.compact_in_place(path, keep, record)
        assert path.read_bytes() == expected, f"cut after {cut} writes"
        if finished:
            n_writes = calls[0]
            break
    # 8 kept rows after the first dropped one move, then the header: 9 writes, every cut
    # tried
    assert n_writes == int(keep.sum()) - 1 + 1


def _kept_images(root: Path, n: int, skipped: set[int]) -> np.ndarray:
    return np.stack([cache_mod._prepare_one(i, str(t1w_path(root, f"sub-{i + 1:02d}")), RES)[1]
                     for i in range(n) if i not in skipped])


def test_prepare_with_a_skipped_subject_writes_each_image_once(tmp_path, monkeypatch):
    root = make_bids(tmp_path / "ds", n=6)
    truncate_gzip(t1w_path(root, "sub-02"))  # skipped: every later subject moves up a row
    expected = _array_file(tmp_path / "expected.npy", _kept_images(root, 6, {1}))
    created: list[str] = []
    writes: list[int] = []
    create = cache_mod.ImageFileWriter.create.__func__
    write = cache_mod.ImageFileWriter.write

    def spy_create(cls, path, shape):
        created.append(Path(path).name)
        return create(cls, path, shape)

    def spy_write(self, index, array):
        writes.append(index)
        return write(self, index, array)

    monkeypatch.setattr(cache_mod.ImageFileWriter, "create", classmethod(spy_create))
    monkeypatch.setattr(cache_mod.ImageFileWriter, "write", spy_write)
    monkeypatch.setattr(cache_mod, "compact_in_place", None)  # must not be needed
    cohort = cache_mod.prepare_cohort(load_bids(root), tmp_path / "cache", resolution=RES,
                                      on_error="skip", n_jobs=1, progress=False)
    assert created == ["images.npy"] and writes == [0, 1, 2, 3, 4]  # once, in final rows
    assert list(cohort.skipped["participant_id"]) == ["sub-02"]
    assert (cohort.root / "images.npy").read_bytes() == expected
    assert cohort.images.shape == (5, *load_template(RES).shape)
    assert sorted(p.name for p in cohort.root.iterdir()) == [
        "images.npy", "mask.npy", "metadata.json", "skipped.tsv", "table.tsv"]


def test_workers_finishing_out_of_order_give_the_same_cache(tmp_path, monkeypatch):
    # 2 workers finish images out of order; each waits for the images before it to find
    # its row. An interruption in the middle resumes to the same bytes.
    n = cache_mod.MIN_IMAGES_FOR_WORKERS + 4
    root = make_bids(tmp_path / "ds", n=n)
    for pid in ("sub-03", "sub-07"):
        truncate_gzip(t1w_path(root, pid))
    kw = {"resolution": RES, "on_error": "skip", "progress": False}
    one = cache_mod.prepare_cohort(load_bids(root), tmp_path / "one", n_jobs=1, **kw)
    two = cache_mod.prepare_cohort(load_bids(root), tmp_path / "two", n_jobs=2, **kw)
    assert (one.root / "images.npy").read_bytes() == (two.root / "images.npy").read_bytes()
    assert one.table.equals(two.table)

    out = tmp_path / "cut"
    prepare_one = cache_mod._prepare_one
    calls = [0]

    def interrupted(i, *args):
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return prepare_one(i, *args)

    monkeypatch.setattr(cache_mod, "_prepare_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache_mod.prepare_cohort(load_bids(root), out, n_jobs=1, **kw)
    monkeypatch.setattr(cache_mod, "_prepare_one", prepare_one)
    done = next(out.glob("*.partial")) / "done.tsv"
    assert [line.split("\t")[0] for line in done.read_text().splitlines()] == [
        "0", "1", "2", "3", "4"]  # recorded in manifest order; sub-03 skipped, no row
    resumed = cache_mod.prepare_cohort(load_bids(root), out, n_jobs=1, **kw)
    assert (resumed.root / "images.npy").read_bytes() == (one.root / "images.npy").read_bytes()


def test_an_earlier_versions_partial_is_compacted_and_resumes(tmp_path, monkeypatch):
    # An unfinished preparation of the earlier layout (one slot per manifest row) is
    # finished as it was started; its kept rows move up in place, and a compaction cut
    # in the middle resumes.
    root = make_bids(tmp_path / "ds", n=6)
    truncate_gzip(t1w_path(root, "sub-03"))
    kw = {"resolution": RES, "on_error": "skip", "n_jobs": 1, "progress": False}
    whole = cache_mod.prepare_cohort(load_bids(root), tmp_path / "whole", **kw)
    out = tmp_path / "cache"
    clean, _, params, key = cache_mod._resolve(
        load_bids(root), resolution=RES, on_error="skip", split_fractions=(0.7, 0.15, 0.15),
        seed=0, metadata=None, age_range=(0, 120))
    partial = out / f"{key}.partial"
    cache_mod._compute_images(clean, partial, load_template(RES), params=params,
                              on_error="skip", n_jobs=1, progress=False,
                              positions=range(len(clean)))  # the slot layout
    info = json.loads((partial / "partial.json").read_text())
    assert info["layout"] == "slots"
    del info["layout"]  # as the earlier version wrote it
    (partial / "partial.json").write_text(json.dumps(info))
    monkeypatch.setattr(cache_mod, "COMPACT_BATCH", 1)
    compact = cache_mod.compact_in_place
    real_pwrite = cache_mod.os.pwrite

    def cut_compaction(path, keep, record, **options):
        writes = [0]

        def failing(fd, data, offset):
            if writes[0] == 2:  # the second kept row moved, the third not yet
                raise Cut
            writes[0] += 1
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(cache_mod.os, "pwrite", failing)
        try:
            compact(path, keep, record, **options)
        finally:
            monkeypatch.setattr(cache_mod.os, "pwrite", real_pwrite)

    monkeypatch.setattr(cache_mod, "compact_in_place", cut_compaction)
    with pytest.raises(Cut):
        cache_mod.prepare_cohort(load_bids(root), out, **kw)
    assert (partial / "compact.json").is_file()
    monkeypatch.setattr(cache_mod, "compact_in_place", compact)
    computed: list[int] = []
    prepare_one = cache_mod._prepare_one
    monkeypatch.setattr(cache_mod, "_prepare_one",
                        lambda i, *a: computed.append(i) or prepare_one(i, *a))
    again = cache_mod.prepare_cohort(load_bids(root), out, **kw)
    assert computed == []  # every image was already there: only the compaction resumed
    assert (again.root / "images.npy").read_bytes() == (whole.root / "images.npy").read_bytes()
    assert again.table.equals(whole.table)
    assert not list(out.glob("*.partial"))
