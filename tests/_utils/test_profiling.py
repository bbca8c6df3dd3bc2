"""Tests of the cost measurement."""

from __future__ import annotations

import time

import numpy as np

from brainage_core._utils.profiling import measure_cost


def test_measure_cost_sees_time_and_memory():
    with measure_cost() as cost:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        time.sleep(0.05)
        del block
    assert cost.seconds >= 0.05
    assert cost.peak_rss_mb > 40
    with measure_cost() as small:
        python = list(range(50_000))  # Python objects: tracemalloc sees them
        del python
    assert small.peak_python_mb > 0.5
