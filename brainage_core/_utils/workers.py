"""Worker processes that live and die with their parent.

:func:`process_pool` is the one way the package starts worker processes (the synthetic
generator, the cache preparation). Its workers

- die with their parent: on Linux the kernel sends them SIGKILL when the parent dies
  (``prctl(PR_SET_PDEATHSIG)``), and a watchdog thread in each worker exits when its
  parent pid changes (the portable fallback). A killed command therefore never leaves
  workers behind;
- never hold a lock: they close their copies of the parent's lock files
  (:func:`brainage_core._utils.locks.release_inherited_locks`);
- ignore Ctrl-C: the parent receives it and stops them.

An error or an interrupt in the parent cancels the tasks not yet started and waits only
for the few in flight (one per worker). Terminating workers in the middle of a task
could leave half a result in the pool's pipe, on which the executor's own thread would
then wait forever; a second Ctrl-C during that wait does terminate them.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from brainage_core._utils.locks import release_inherited_locks

#: Seconds between two checks of the parent by a worker's watchdog thread.
WATCHDOG_SECONDS = 0.5

_PR_SET_PDEATHSIG = 1


def pool_context() -> multiprocessing.context.BaseContext:
    """``fork`` on Linux (workers start at once and share loaded data), else ``spawn``."""
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return multiprocessing.get_context(method)


@contextlib.contextmanager
def process_pool(
    n_jobs: int,
    *,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[cf.ProcessPoolExecutor]:
    """A :class:`~concurrent.futures.ProcessPoolExecutor` whose workers die with the caller.

    Parameters
    ----------
    n_jobs : int
        Worker processes.
    initializer : callable or None, default=None
        Run in each worker after it is tied to its parent.
    initargs : tuple, default=()
        Arguments of ``initializer``.

    Yields
    ------
    concurrent.futures.ProcessPoolExecutor
        Shut down on exit: after the pending tasks on success; after the tasks in flight
        only (the others cancelled) on an error or an interrupt.
    """
    executor = cf.ProcessPoolExecutor(
        max_workers=n_jobs,
        mp_context=pool_context(),
        initializer=_init_worker,
        initargs=(os.getpid(), initializer, initargs),
    )
    try:
        yield executor
    except BaseException:
        try:
            executor.shutdown(wait=True, cancel_futures=True)
        except BaseException:  # a second Ctrl-C: stop waiting
            terminate_pool(executor)
        raise
    executor.shutdown(wait=True)


def terminate_pool(executor: cf.ProcessPoolExecutor) -> None:
    """Cancel the pending tasks and terminate the workers without waiting for them.

    Only for a caller that gives up on the pool for good (see the module docstring).
    """
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(timeout=5)


def _init_worker(
    parent_pid: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]
) -> None:
    tie_to_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's handler is not ours
    release_inherited_locks()
    if initializer is not None:
        initializer(*initargs)


def tie_to_parent(parent_pid: int) -> None:
    """Make this (worker) process exit when ``parent_pid`` is no longer its parent."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(
        target=_watch_parent, args=(parent_pid,), name="parent-watchdog", daemon=True
    ).start()


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(WATCHDOG_SECONDS)
        if os.getppid() != parent_pid:
            os._exit(1)
