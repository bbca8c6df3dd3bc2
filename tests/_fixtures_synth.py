"""Shared fixtures: tiny synthetic cohorts (8 mm grid, seconds to generate).

Import them in a test module with ``from _fixtures_synth import tiny_cohort`` (pytest puts
``tests/`` on the path).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from brainage_core.synth import SynthConfig, generate_cohort

#: A tiny cohort: 8 mm grid, 6 subjects, default ageing and nuisance.
TINY_CONFIG = {"n_subjects": 6, "resolution": 8, "seed": 3}
# (rendered at the default 2 mm: the generator's default path is what the tests exercise)

#: Ageing planted in the putamen only (atrophy), no nuisance: the truth is known exactly.
PUTAMEN_CONFIG = {
    "n_subjects": 4,
    "resolution": 8,
    "seed": 5,
    "effects": [{"kind": "atrophy", "regions": ["Putamen"], "strength": 0.6}],
}


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
