"""Benchmarks: speed and accuracy figures, printed, never asserted in unit tests.

Each benchmark is a module ``brainage_core.bench.<name>`` with ``run(args) -> dict``:
it prints its figures and returns them. ``brainage-study bench <name>`` runs one, ``bench
all`` runs them in :data:`BENCHMARKS` order.

=========  ================================================================================
data       generation and preparation of a cohort: seconds per subject, peak RAM, cache size
predict    the predictor on the default cohort: test/oracle/baseline MAE, seconds per epoch
maps       the noise-model maps: localisation AUROC, region ranking, ms per subject;
           with --compare RUN_DIR: every attribution method side by side (step 06)
memory     memory per subject of each heavy step at the run's grid, estimated at 2 and 1 mm
=========  ================================================================================
"""

from __future__ import annotations

import importlib
from types import ModuleType

from brainage_core._utils.validation import BrainAgeInputError

#: Benchmark modules in the order ``bench all`` runs them.
BENCHMARKS = ("data", "predict", "maps", "memory")


def load_benchmark(name: str) -> ModuleType:
    """Import ``brainage_core.bench.<name>``; a clear error if it is unknown or missing.

    Raises
    ------
    BrainAgeInputError
        If ``name`` is not a benchmark, or its module is not part of this installation
        or has no ``run(args)`` function.
    """
    if name not in BENCHMARKS:
        raise BrainAgeInputError(f"'benchmark' must be one of {BENCHMARKS}; {name!r} was provided.")
    module_name = f"{__name__}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise BrainAgeInputError(
            f"the '{name}' benchmark is not available: module {module_name} is not part of "
            "this installation."
        ) from err
    if not callable(getattr(module, "run", None)):
        raise BrainAgeInputError(f"benchmark module {module_name} has no run(args) function.")
    return module
