"""The cache survives SIGKILL at any moment, temporary files and umask (issue 10).

Every preparation here uses 2 worker processes. The commands run in forked children (a
fork starts in milliseconds, where a fresh interpreter takes seconds to import the
stack), which are killed with SIGKILL at chosen points or at seeded random moments.
After each kill, no process of the killed command may be left, and the next command
must finish and publish a cache identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.data import RES, make_bids
from helpers.processes import (
    cache_files,
    descendants,
    kill_family,
    leftovers,
    published,
    start_forked,
    wait_for,
    wait_gone,
)

from brainage_core._utils import io as _io
from brainage_core.data import cache
from brainage_core.data.sources.bids import load_bids

FORK = multiprocessing.get_context("fork")
N_IMAGES = 40


@pytest.fixture(scope="module")
def bids40(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BIDS folder of 40 subjects at 8 mm."""
    return make_bids(tmp_path_factory.mktemp("kill") / "bids", n=N_IMAGES)


@pytest.fixture(scope="module")
def reference(bids40: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files of an uninterrupted preparation (2 workers)."""
    out = tmp_path_factory.mktemp("reference")
    cohort = cache.prepare_cohort(load_bids(bids40), out, resolution=RES, n_jobs=2,
                                  progress=False)
    return cache_files(cohort.root)


def _prepare(bids: str, out: str, flush_every: int, slow_publish: str | None) -> None:
    """Child: prepare the cohort (2 workers); optionally pause inside the publication."""
    cache.FLUSH_EVERY = flush_every
    if slow_publish is not None:  # stop just before metadata.json's temporary file is moved
        plain = _io.atomic_path

        @contextlib.contextmanager
        def paused(path):
            with plain(path) as tmp:
                yield tmp
                if Path(path).name == "metadata.json":
                    Path(slow_publish).touch()
                    time.sleep(60)

        _io.atomic_path = paused
    cache.prepare_cohort(load_bids(bids), out, resolution=RES, n_jobs=2, progress=False)
    os._exit(0)


def _finish_prepare(bids: Path, out: Path) -> Path:
    proc = start_forked(_prepare, str(bids), str(out), cache.FLUSH_EVERY, None)
    proc.join(120)
    assert proc.exitcode == 0, f"the preparation after the kill did not finish: {proc.exitcode}"
    return published(out)


def _done_lines(out: Path) -> int:
    done = next(out.glob("*.partial/done.tsv"), None)
    return len(done.read_text().splitlines()) if done is not None else 0


@pytest.mark.parametrize("point", ["workers started", "images recorded", "during publish"])
def test_prepare_killed_resumes_to_an_identical_cache(
    point: str, bids40: Path, reference: dict[str, bytes], tmp_path: Path
) -> None:
    out = tmp_path / "cache"
    flag = tmp_path / "publishing"
    proc = start_forked(
        _prepare, str(bids40), str(out), 4, str(flag) if point == "during publish" else None
    )
    if point == "workers started":
        wait_for(lambda: any(out.glob("*.partial/images.npy"))
                  and len(descendants(proc.pid)) >= 2, proc, point)
    elif point == "images recorded":
        wait_for(lambda: _done_lines(out) >= 8, proc, point)
    else:
        wait_for(flag.exists, proc, point)
        partial = next(out.glob("*.partial"))
        assert any(_io.is_temporary_file(p) for p in partial.iterdir())  # the kill's leftover
    family = kill_family(proc)
    assert len(family) >= (2 if point != "during publish" else 0)
    assert wait_gone(family, 3.0), "processes of the killed prepare are still running"
    assert published(out, required=False) is None

    final = _finish_prepare(bids40, out)
    assert cache_files(final) == reference
    assert not list(out.glob("*.partial"))


def test_prepare_killed_20_times_at_random_moments(
    bids40: Path, reference: dict[str, bytes], tmp_path: Path
) -> None:
    """Seeded stress test: 20 SIGKILLs at random moments, then uninterrupted runs.

    When a kill comes too late (the cache was already published), the next kills go to
    a new cache folder, so that every kill can cut real work; every folder must end
    identical to the uninterrupted preparation.
    """
    start = time.monotonic()
    probe = start_forked(_prepare, str(bids40), str(tmp_path / "timing"), 4, None)
    probe.join(120)
    duration = time.monotonic() - start
    assert probe.exitcode == 0
    rng = np.random.default_rng(10)
    folders = [tmp_path / "cache-0"]
    cut = cut_with_workers = 0
    families: list[int] = []
    began = time.monotonic()
    for _ in range(20):
        out = folders[-1]
        proc = start_forked(_prepare, str(bids40), str(out), 4, None)
        time.sleep(float(rng.uniform(0.02, 0.6)) * duration)
        family = kill_family(proc)
        families += family
        assert wait_gone(family, 3.0), "processes of a killed prepare are still running"
        if published(out, required=False) is None:
            cut += 1
            cut_with_workers += len(family) >= 2
        else:  # this one finished before its kill: start a new folder
            folders.append(tmp_path / f"cache-{len(folders)}")
    elapsed = time.monotonic() - began
    for out in folders:
        if out.exists():
            assert cache_files(_finish_prepare(bids40, out)) == reference
            assert not list(out.glob("*.partial")) and not list(out.rglob(".*.tmp*"))
    # The kills did cut real work. How many land while the workers run depends on the
    # machine's speed (1 to 8 of 20 in runs on an idle machine), so that count is only
    # printed; a kill with the workers running is asserted by the fixed-point test above.
    assert cut >= 10
    assert wait_gone(families, 0.1) and leftovers() == []  # nothing left of 20+ commands
    print(f"20 kills in {elapsed:.1f} s: {cut} cut a preparation ({cut_with_workers} with its "
          f"workers running), {len(folders)} cache folder(s); an uninterrupted prepare took "
          f"{duration:.2f} s")


def test_no_temporary_file_reaches_a_published_cache(tiny_bids, tmp_path) -> None:
    reference = cache.prepare_cohort(load_bids(tiny_bids), tmp_path / "ref", resolution=RES,
                                     n_jobs=1, progress=False)  # fmt: skip
    out = tmp_path / "c"
    shutil.copytree(reference.root, out / (reference.root.name + ".partial"))
    partial = out / (reference.root.name + ".partial")
    (partial / "metadata.json").unlink()  # as if killed during the publication
    (partial / ".table.tsv.k2j4.tmp.tsv").write_text("half a table")
    (partial / "images.compact.npy").write_bytes(b"half")
    again = cache.prepare_cohort(load_bids(tiny_bids), out, resolution=RES, n_jobs=1,
                                 progress=False)  # fmt: skip
    assert cache_files(again.root) == cache_files(reference.root)
    assert published(out) == again.root


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_respect_the_umask(umask: int, tiny_bids, tmp_path) -> None:
    old = os.umask(umask)
    try:
        path = _io.write_text(tmp_path / "a.txt", "x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
        cohort = cache.prepare_cohort(load_bids(tiny_bids), tmp_path / f"c{umask}",
                                      resolution=RES, n_jobs=1, progress=False)  # fmt: skip
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in cohort.root.iterdir()}
        assert set(modes.values()) == {0o666 & ~umask}, modes
    finally:
        os.umask(old)
