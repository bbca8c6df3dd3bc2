"""Shared test fixtures. Tests are seeded, small (8 mm grids) and quiet."""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers.data import make_bids  # noqa: E402
from helpers.runs import make_trained_run  # noqa: E402
from helpers.synth import PUTAMEN_CONFIG, TINY_CONFIG  # noqa: E402

from brainage_core.data.synth import SynthConfig, generate_cohort  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded random generator."""
    return np.random.default_rng(0)


@pytest.fixture
def tiny_bids(tmp_path: Path) -> Path:
    """A BIDS folder of 6 subjects at 8 mm."""
    return make_bids(tmp_path / "bids", n=6)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny synthetic cohort (see :data:`TINY_CONFIG`)."""
    out = tmp_path_factory.mktemp("synth") / "tiny"
    return generate_cohort(SynthConfig.from_dict(TINY_CONFIG), out, n_jobs=1, progress=False)


@pytest.fixture(scope="session")
def putamen_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny cohort whose only age effect is putamen atrophy."""
    out = tmp_path_factory.mktemp("synth") / "putamen"
    return generate_cohort(SynthConfig.from_dict(PUTAMEN_CONFIG), out, n_jobs=1, progress=False)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_cohort: Path):
    """A tiny run trained on :func:`tiny_cohort` (predictions, metrics, ``index.json``)."""
    root = tmp_path_factory.mktemp("trained")
    return make_trained_run(root / "run", tiny_cohort, root / "cache")
