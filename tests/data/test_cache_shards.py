"""Sharded preparation: N shards publish the cache that one process makes."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing as mp
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers.data import RES, make_bids, t1w_path, truncate_gzip

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.cli import main
from brainage_core.data.cache import prepare_cohort, prepare_shard
from brainage_core.data.sources.bids import load_bids
from brainage_core.data.sources.csv import load_csv


def _same_cache(a: Path, b: Path) -> None:
    assert (a / "images.npy").read_bytes() == (b / "images.npy").read_bytes()
    for name in ("table.tsv", "skipped.tsv", "mask.npy"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    meta_a, meta_b = (json.loads((d / "metadata.json").read_text()) for d in (a, b))
    meta_a.pop("created"), meta_b.pop("created")
    assert meta_a == meta_b


def test_two_shards_publish_the_cache_of_one_process(tmp_path: Path) -> None:
    root = make_bids(tmp_path / "ds", n=7)
    truncate_gzip(t1w_path(root, "sub-04"))  # a skipped subject, in shard 1
    kw = {"resolution": RES, "on_error": "skip", "progress": False, "n_jobs": 1}
    whole = prepare_cohort(load_bids(root), tmp_path / "one", **kw)
    assert list(whole.skipped["participant_id"]) == ["sub-04"]

    cache = tmp_path / "sharded"
    assert prepare_shard(load_bids(root), cache, shard=(1, 2), **kw) is None  # shard 0 missing
    names = sorted(p.name for p in cache.iterdir())
    assert [n.split(".", 1)[1] for n in names] == ["shard-1-of-2"]  # no shared lock file
    # a shard's part holds only its own rows: 3 of the 7 (rows 1, 3, 5)
    part = np.load(cache / names[0] / "images.npy", mmap_mode="r")
    assert part.shape[0] == 3
    # an abandoned earlier attempt with 3 shards left a part behind
    abandoned = cache / names[0].replace("shard-1-of-2", "shard-2-of-3")
    abandoned.mkdir()
    (abandoned / "done.tsv").write_text("index\treason\n")
    sharded = prepare_shard(load_bids(root), cache, shard=(0, 2), **kw)
    assert sharded is not None and sharded.root.name == whole.root.name
    _same_cache(whole.root, sharded.root)
    assert [p.name for p in cache.iterdir()] == [whole.root.name]  # every part removed
    # a later call (any shard) finds the published cache
    again = prepare_shard(load_bids(root), cache, shard=(1, 2), **kw)
    assert again is not None and again.root == sharded.root


def test_a_publication_claimed_on_another_host_says_how_to_go_on(tmp_path: Path) -> None:
    # A claim whose holder runs on another host cannot be checked from here: if that job
    # died, no shard would ever publish. The shard says so, naming the folder; once the
    # folder is removed, running a shard again publishes the cache.
    root = make_bids(tmp_path / "ds", n=4)
    kw = {"resolution": RES, "progress": False, "n_jobs": 1}
    cache = tmp_path / "sharded"
    assert prepare_shard(load_bids(root), cache, shard=(0, 2), **kw) is None
    key = next(cache.iterdir()).name.split(".", 1)[0]
    claim = cache / f"{key}.publishing"
    claim.mkdir()
    (claim / "holder.json").write_text(json.dumps({
        "pid": 1, "host": "node-17.cluster", "command": "brainage-study prepare",
        "started": "2026-12-01T00:00:00+00:00"}))
    with pytest.warns(UserWarning, match=r"\.publishing: the cache is being published by "
                      r"pid 1 on node-17\.cluster .*remove this folder and run any shard"):
        assert prepare_shard(load_bids(root), cache, shard=(1, 2), **kw) is None
    shutil.rmtree(claim)  # what the warning tells the user to do
    published = prepare_shard(load_bids(root), cache, shard=(1, 2), **kw)
    assert published is not None and published.root.name == key


def _cli_shard(args: list[str], index: int, start, outs) -> None:
    """``brainage-study prepare ... --shard INDEX 2``, started with the other shard."""
    buffer = io.StringIO()
    start.wait()
    with contextlib.redirect_stdout(buffer):
        code = main([*args, "--shard", str(index), "2"])
    outs.put((code, buffer.getvalue()))


def test_shards_started_at_the_same_moment_publish_once(tmp_path: Path) -> None:
    root = make_bids(tmp_path / "ds", n=6)
    manifest = tmp_path / "manifest.csv"
    load_bids(root)[["participant_id", "path", "age"]].to_csv(manifest, index=False)
    whole = prepare_cohort(load_csv(manifest), tmp_path / "one", resolution=RES,
                           progress=False, n_jobs=1)
    cache = tmp_path / "sharded"
    args = ["prepare", "--csv", str(manifest), "--out", str(cache), "--resolution", str(RES),
            "--n-jobs", "1", "--no-progress"]
    ctx = mp.get_context("fork")
    start, outs = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_cli_shard, args=(args, i, start, outs)) for i in (0, 1)]
    for proc in procs:
        proc.start()
    results = [outs.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert sorted(code for code, _ in results) == [0, 0], results
    assert any("prepared cohort:" in out for _, out in results)  # the last shard published
    # and cleaned up: the cache and its QC report (written by the publishing shard) remain
    assert sorted(p.name for p in cache.iterdir()) == [whole.root.name, f"{whole.root.name}.qc"]
    _same_cache(whole.root, cache / whole.root.name)


@pytest.mark.parametrize("shard", [(2, 2), (-1, 2), (0, 0), "0/2"])
def test_a_bad_shard_is_one_clear_error(tmp_path: Path, shard) -> None:
    root = make_bids(tmp_path / "ds", n=2)
    with pytest.raises(BrainAgeInputError, match="'shard' must be"):
        prepare_shard(load_bids(root), tmp_path / "c", shard=shard, resolution=RES)
