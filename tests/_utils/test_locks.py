"""Locks tied to a live process, and worker pools that die with their parent (issue 10)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
from helpers.processes import alive, children, wait_gone

from brainage_core._utils import locks as _locks
from brainage_core._utils.locks import (
    LOCK_WAIT_ENV,
    LockBusy,
    LockHolder,
    file_lock,
    is_locked,
    read_lock_holder,
)
from brainage_core._utils.workers import process_pool

FORK = multiprocessing.get_context("fork")


def _hold(path: str, ready: str, seconds: float, spawn_orphan: bool) -> None:
    """Child: take the lock, optionally fork a grandchild that keeps the file, then wait."""
    with file_lock(path):
        if spawn_orphan:
            pid = os.fork()
            if pid == 0:  # a careless grandchild: keeps the lock file open, sleeps
                keep = set(_locks._HELD.values())  # close the rest (multiprocessing's pipes)
                for fd in map(int, os.listdir("/proc/self/fd")):
                    if fd > 2 and fd not in keep:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                time.sleep(60)
                os._exit(0)
            Path(ready + ".orphan").write_text(str(pid))
        Path(ready).write_text(str(os.getpid()))
        time.sleep(seconds)


def _start_holder(tmp_path: Path, seconds: float, spawn_orphan: bool = False):
    lock, ready = tmp_path / "x.lock", tmp_path / "ready"
    proc = FORK.Process(target=_hold, args=(str(lock), str(ready), seconds, spawn_orphan))
    proc.start()
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert time.monotonic() < deadline, "the holder did not start"
        time.sleep(0.01)
    return proc, lock, ready


def test_the_holder_is_recorded_and_cleared(tmp_path: Path) -> None:
    lock = tmp_path / "a.lock"
    with file_lock(lock) as me:
        holder = read_lock_holder(lock)
        assert holder == me and holder.pid == os.getpid() and is_locked(lock)
        assert holder.describe().startswith(f"pid {os.getpid()} on {holder.host} (")
    assert read_lock_holder(lock) is None and not is_locked(lock)
    assert lock.read_text() == ""


def test_a_live_holder_is_named_when_refused_and_waited_for(tmp_path: Path, capsys) -> None:
    proc, lock, _ = _start_holder(tmp_path, seconds=1.5)
    try:
        with pytest.raises(LockBusy) as err, file_lock(lock, wait=False, what="this cache entry"):
            pass
        message = str(err.value)
        assert message.startswith(f"{lock}: this cache entry is in use by pid {proc.pid} on ")
        assert message.endswith("wait for it to finish, or leave out --no-wait to wait for it")
        # the environment variable set by --no-wait has the same effect (run's kernels)
        os.environ[LOCK_WAIT_ENV] = "0"
        try:
            with pytest.raises(LockBusy), file_lock(lock):
                pass
        finally:
            del os.environ[LOCK_WAIT_ENV]
        start = time.monotonic()
        with file_lock(lock, what="this cache entry") as me:
            waited = time.monotonic() - start
            assert me.pid == os.getpid()
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1  # one notice, however long the wait
        assert lines[0].startswith(
            f"note: {lock}: this cache entry is in use by pid {proc.pid} on {me.host} ("
        )
        assert ", since " in lines[0]
        assert lines[0].endswith("); waiting for it (Ctrl-C to stop)")
        assert 0.3 < waited < 10
    finally:
        proc.join(10)


def test_a_lock_left_by_a_killed_holder_is_taken_over(tmp_path: Path, capsys) -> None:
    proc, lock, _ = _start_holder(tmp_path, seconds=60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    start = time.monotonic()
    with file_lock(lock):
        assert time.monotonic() - start < 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"note: {lock}: taking over the lock of pid {proc.pid} on ")
    assert err[0].endswith("which stopped without releasing it")


def test_a_lock_kept_open_by_the_dead_holders_children_is_taken_over(
    tmp_path: Path, capsys
) -> None:
    proc, lock, ready = _start_holder(tmp_path, seconds=60, spawn_orphan=True)
    orphan = int(Path(str(ready) + ".orphan").read_text())
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert alive(orphan) and is_locked(lock)  # the flock lives on in the orphan
        start = time.monotonic()
        with file_lock(lock) as me:
            assert time.monotonic() - start < 5
            assert read_lock_holder(lock) == me
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        assert err[0].startswith(f"note: {lock}: taking over the lock of pid {proc.pid} on ")
        assert err[0].endswith("which is no longer running")
    finally:
        os.kill(orphan, signal.SIGKILL)


def test_a_holder_on_another_host_is_never_taken_over() -> None:
    other = LockHolder(pid=1, host="another-host", command="x", started="t")
    assert other.is_alive() is None
    dead_here = LockHolder(pid=2**22 + 7, host=LockHolder.current().host, command="x", started="t")
    assert dead_here.is_alive() is False
    assert LockHolder.current().is_alive() is True


# -- worker pools ---------------------------------------------------------------------------
def _sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _pool_then_wait(lock: str, pids_file: str) -> None:
    with file_lock(lock), process_pool(2) as pool:
        futures = [pool.submit(_sleep, 60) for _ in range(2)]
        del futures
        deadline = time.monotonic() + 20
        while len(children(os.getpid())) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        workers = children(os.getpid())
        Path(pids_file).write_text(" ".join(map(str, workers)))
        time.sleep(60)


def test_workers_die_with_a_killed_parent_and_never_hold_its_lock(tmp_path: Path) -> None:
    lock, pids_file = tmp_path / "p.lock", tmp_path / "pids"
    proc = FORK.Process(target=_pool_then_wait, args=(str(lock), str(pids_file)))
    proc.start()
    deadline = time.monotonic() + 30
    while not pids_file.exists() or not pids_file.read_text():
        assert time.monotonic() < deadline, "the pool did not start"
        time.sleep(0.02)
    workers = [int(p) for p in pids_file.read_text().split()]
    assert len(workers) >= 2 and all(alive(p) for p in workers) and is_locked(lock)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert not is_locked(lock)  # released at once: the workers never held it
    assert wait_gone(workers, 3.0), "workers outlived their killed parent"


def test_an_error_in_the_pool_cancels_the_pending_tasks_and_stops_the_workers() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="stop"), process_pool(2) as pool:
        futures = [pool.submit(_sleep, 1.0) for _ in range(40)]
        time.sleep(0.5)
        workers = children(os.getpid())
        assert len(workers) == 2
        raise RuntimeError("stop")
    assert time.monotonic() - start < 10  # 40 tasks would take 20 s: only those in flight ran
    assert sum(f.cancelled() for f in futures) >= 30 and all(f.done() for f in futures)
    assert wait_gone(workers, 3.0)
