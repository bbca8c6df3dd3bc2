"""Cost of a piece of work: wall time and peak memory, measured in the same run."""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass


def _rss_bytes() -> int:
    """Resident memory of this process (Linux ``/proc``; else the peak from ``resource``)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Cost:
    """What :func:`measure_cost` measured.

    Attributes
    ----------
    seconds : float
        Wall time.
    peak_rss_mb : float
        Peak resident memory above its level at the start (sampled every 2 ms; tensors
        allocated by torch count here, memory the allocator kept from earlier work
        does not).
    peak_python_mb : float
        Peak of Python-level allocations (``tracemalloc``; torch tensors are not
        included).
    """

    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_python_mb: float = 0.0


@contextlib.contextmanager
def measure_cost(*, interval: float = 0.002) -> Iterator[Cost]:
    """Measure the wall time and the peak memory of the ``with`` block.

    Examples
    --------
    >>> with measure_cost() as cost:
    ...     _ = [0] * 1000
    >>> cost.seconds >= 0
    True
    """
    cost = Cost()
    start_rss = _rss_bytes()
    peak = [start_rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    thread.start()
    start = time.perf_counter()
    try:
        yield cost
    finally:
        cost.seconds = time.perf_counter() - start
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        cost.peak_python_mb = tracemalloc.get_traced_memory()[1] / 2**20
        if not tracing:
            tracemalloc.stop()
        cost.peak_rss_mb = (peak[0] - start_rss) / 2**20
