"""SIGKILL and Ctrl-C during ``prepare`` and ``run``: the next command finishes (issue 10).

Every preparation here uses 2 worker processes. The commands run in forked children (a
fork starts in milliseconds, where a fresh interpreter takes seconds to import the
stack), which are killed with SIGKILL at chosen points or at seeded random moments.
After each kill, no process of the killed command may be left, and the next command
must finish and publish a cache identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from _fixtures_data import RES, make_bids
from _reliability import cache_files, descendants, leftovers, published, wait_gone

from brainage_core import _io, cache
from brainage_core._locks import read_lock_holder
from brainage_core.manifest import load_bids

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


def _start(target: Callable, *args) -> multiprocessing.Process:
    proc = FORK.Process(target=target, args=args)
    proc.start()
    return proc


def _wait_for(condition: Callable[[], bool], proc: multiprocessing.Process, what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert proc.is_alive(), f"the command ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _kill(proc: multiprocessing.Process) -> list[int]:
    """SIGKILL ``proc``; return the processes it had started (all must be gone soon)."""
    family = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    return family


def _finish_prepare(bids: Path, out: Path) -> Path:
    proc = _start(_prepare, str(bids), str(out), cache.FLUSH_EVERY, None)
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
    proc = _start(
        _prepare, str(bids40), str(out), 4, str(flag) if point == "during publish" else None
    )
    if point == "workers started":
        _wait_for(lambda: any(out.glob("*.partial/images.npy"))
                  and len(descendants(proc.pid)) >= 2, proc, point)
    elif point == "images recorded":
        _wait_for(lambda: _done_lines(out) >= 8, proc, point)
    else:
        _wait_for(flag.exists, proc, point)
        partial = next(out.glob("*.partial"))
        assert any(_io.is_temporary_file(p) for p in partial.iterdir())  # the kill's leftover
    family = _kill(proc)
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
    probe = _start(_prepare, str(bids40), str(tmp_path / "timing"), 4, None)
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
        proc = _start(_prepare, str(bids40), str(out), 4, None)
        time.sleep(float(rng.uniform(0.02, 0.6)) * duration)
        family = _kill(proc)
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
    assert cut >= 10 and cut_with_workers >= 5  # the kills did cut real work
    assert wait_gone(families, 0.1) and leftovers() == []  # nothing left of 20+ commands
    print(f"20 kills in {elapsed:.1f} s: {cut} cut a preparation ({cut_with_workers} with its "
          f"workers running), {len(folders)} cache folder(s); an uninterrupted prepare took "
          f"{duration:.2f} s")


# -- brainage-study run ---------------------------------------------------------------------
RUN_OVERRIDES = [
    "-p", "data.synthetic.n_subjects", "24", "-p", "data.synthetic.resolution", "8",
    "-p", "data.resolution", "8",
]  # fmt: skip


def _run_cli(argv: list[str], stderr: str) -> None:
    """Child: ``brainage-study run ...``; exit with its status, standard error to a file."""
    fd = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    os.environ["TQDM_DISABLE"] = "1"
    from brainage_core.cli import main

    code = main(argv)
    sys.stderr.flush()
    os._exit(code)


@pytest.mark.slow
def test_run_killed_and_interrupted_then_resumed(tmp_path: Path) -> None:
    """SIGKILL during the cohort's generation, Ctrl-C while preparing, then a clean run."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    source = Path(__file__).resolve().parents[1] / "notebooks" / "01_data.ipynb"
    shutil.copy(source, notebooks)  # the data step alone
    cache_dir = tmp_path / "cache"
    run_dir = tmp_path / "run"
    argv = ["run", "--preset", "quick", "--notebooks", str(notebooks), "--run-dir",
            str(run_dir), "-p", "data.cache_dir", str(cache_dir), *RUN_OVERRIDES]  # fmt: skip
    err = tmp_path / "stderr"

    # the reference: an uninterrupted run, its cache then moved aside
    ref = _start(_run_cli, argv, str(err))
    ref.join(300)
    assert ref.exitcode == 0, err.read_text()
    # the key hashes the images' modification times, which a resumed generation changes
    reference = cache_files(published(cache_dir / "prepared"), ignore=("created", "key"))
    synthetic = cache_files(published(cache_dir / "synthetic"))
    cache_dir.rename(tmp_path / "cache-reference")
    shutil.rmtree(run_dir)

    # 1. SIGKILL while the synthetic cohort is generated (2 workers in the kernel)
    proc = _start(_run_cli, argv, str(err))
    _wait_for(lambda: len(list(cache_dir.glob("synthetic/*.partial/sub-*"))) >= 3
              and len(descendants(proc.pid)) >= 3, proc, "the generation")
    family = _kill(proc)
    assert len(family) >= 3  # the notebook kernel and its 2 workers
    assert wait_gone(family, 2.0), "the kernel or its workers outlived the killed run"
    assert not (cache_dir / "prepared").exists()  # the kernel stopped with its run

    # 2. Ctrl-C while the cohort is prepared: one line, status 130, step "interrupted"
    proc = _start(_run_cli, argv, str(err))

    def preparing() -> bool:  # by this run's kernel: it holds the cache entry's lock
        holders = [read_lock_holder(p) for p in cache_dir.glob("prepared/*.lock")]
        kernel = descendants(proc.pid)
        return any(h is not None and h.pid in kernel for h in holders) and any(
            cache_dir.glob("prepared/*.partial/images.npy")
        )

    _wait_for(preparing, proc, "the preparation")
    family = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGINT)
    proc.join(60)
    assert proc.exitcode == 130
    lines = err.read_text().strip().splitlines()
    assert lines[-1] == (
        "brainage-study run: error: interrupted (Ctrl-C); what was finished is kept; run the "
        "same command again to resume"
    )
    assert not any("Traceback" in line for line in lines)
    state = json.loads((run_dir / ".pipeline.json").read_text())
    assert state["steps"]["01_data"]["status"] == "interrupted"
    assert wait_gone(family, 10.0), "the kernel or its workers outlived the interrupted run"

    # 3. the same command finishes, with the same data as the uninterrupted run
    proc = _start(_run_cli, argv, str(err))
    proc.join(300)
    assert proc.exitcode == 0, err.read_text()
    assert cache_files(published(cache_dir / "prepared"), ignore=("created", "key")) == reference
    assert cache_files(published(cache_dir / "synthetic")) == synthetic
    state = json.loads((run_dir / ".pipeline.json").read_text())
    assert state["steps"]["01_data"]["status"] == "ok"
    assert not list(cache_dir.rglob(".*.tmp*")) and not list(cache_dir.rglob("*.partial"))
