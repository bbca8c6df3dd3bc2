"""A skipped subject never rewrites the whole array: in-place, resumable compaction (issue 16)."""

from __future__ import annotations

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


def test_prepare_with_a_skipped_subject_writes_each_image_once(tmp_path, monkeypatch):
    root = make_bids(tmp_path / "ds", n=6)
    truncate_gzip(t1w_path(root, "sub-02"))  # skipped: every later subject moves up
    created: list[str] = []
    create = cache_mod.ImageFileWriter.create.__func__

    def spy(cls, path, shape):
        created.append(Path(path).name)
        return create(cls, path, shape)

    monkeypatch.setattr(cache_mod.ImageFileWriter, "create", classmethod(spy))
    cohort = cache_mod.prepare_cohort(load_bids(root), tmp_path / "cache", resolution=RES,
                                      on_error="skip", n_jobs=1, progress=False)
    assert created == ["images.npy"]  # no second, compacted copy of the array
    assert list(cohort.skipped["participant_id"]) == ["sub-02"]
    # the cache holds what the kept subjects' preprocessing gives, as a file written once
    template = load_template(RES)
    kept = [cache_mod._prepare_one(i, str(t1w_path(root, f"sub-0{i + 1}")), RES)[1]
            for i in (0, 2, 3, 4, 5)]
    monkeypatch.undo()
    expected = _array_file(tmp_path / "expected.npy", np.stack(kept))
    assert (cohort.root / "images.npy").read_bytes() == expected
    assert cohort.images.shape == (5, *template.shape)
    assert sorted(p.name for p in cohort.root.iterdir()) == [
        "images.npy", "mask.npy", "metadata.json", "skipped.tsv", "table.tsv"]


def test_prepare_killed_during_the_compaction_resumes_without_recomputing(tmp_path, monkeypatch):
    root = make_bids(tmp_path / "ds", n=6)
    truncate_gzip(t1w_path(root, "sub-03"))
    kw = {"resolution": RES, "on_error": "skip", "n_jobs": 1, "progress": False}
    whole = cache_mod.prepare_cohort(load_bids(root), tmp_path / "whole", **kw)
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
    out = tmp_path / "cache"
    with pytest.raises(Cut):
        cache_mod.prepare_cohort(load_bids(root), out, **kw)
    partial = next(out.glob("*.partial"))
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
