"""Settings of the tiny synthetic cohorts behind the ``tiny_cohort`` and ``putamen_cohort``
fixtures (8 mm grid, seconds to generate)."""

from __future__ import annotations

#: A tiny cohort: 8 mm grid, 6 subjects, default ageing and nuisance.
TINY_CONFIG = {"n_subjects": 6, "resolution": 8, "seed": 3}

#: Ageing planted in the putamen only (atrophy), no nuisance: the truth is known exactly.
PUTAMEN_CONFIG = {
    "n_subjects": 4,
    "resolution": 8,
    "seed": 5,
    "effects": [{"kind": "atrophy", "regions": ["Putamen"], "strength": 0.6}],
}
