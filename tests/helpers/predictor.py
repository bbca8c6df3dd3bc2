"""Tiny in-memory stand-ins for a prepared cohort, for the predictor's tests.

``FakeCohort`` has the attributes of a ``PreparedCohort`` that the predictor uses
(``images`` as float16 (N, X, Y, Z), ``table``, ``indices``, ``metadata``, ``mask``), with an
age signal planted in a central block: its intensity falls with biological age.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Grid of the fake cohort: small enough for a 2-block CNN to train in a second.
SHAPE = (12, 14, 12)


class FakeCohort:
    """An in-memory cohort with a planted, learnable age signal."""

    def __init__(self, n: int = 40, shape: tuple[int, int, int] = SHAPE, seed: int = 0,
                 noise: float = 0.05) -> None:
        rng = np.random.default_rng(seed)
        age = rng.uniform(45, 82, n)
        accelerated = rng.random(n) < 0.3
        gap = rng.normal(0, 1.0, n) + 6.0 * accelerated
        bio = age + gap
        images = rng.normal(0, noise, (n, *shape))
        x, y, z = shape
        block = (slice(x // 4, 3 * x // 4), slice(y // 4, 3 * y // 4), slice(z // 4, 3 * z // 4))
        images[(slice(None), *block)] += (1.0 - (bio[:, None, None, None] - 45) / 40)
        self.images = images.astype(np.float16)
        self.images.setflags(write=False)
        split = np.array(["train"] * n, dtype=object)
        split[int(0.6 * n): int(0.8 * n)] = "val"
        split[int(0.8 * n):] = "test"
        self.table = pd.DataFrame({
            "participant_id": [f"sub-{i:04d}" for i in range(n)],
            "age": age,
            "sex": np.where(rng.random(n) < 0.5, "M", "F"),
            "site": "fake",
            "split": split,
            "gap": gap,
            "group": np.where(accelerated, "accelerated", "control"),
        })
        self.mask = np.ones(shape, dtype=bool)
        self.metadata = {"oracle_mae": 0.8}
        self.resolution = 8

    def __len__(self) -> int:
        return len(self.table)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.table["split"].to_numpy() == split)

    def image(self, i: int) -> np.ndarray:
        return np.asarray(self.images[i], dtype=np.float32)


#: Settings of a tiny, fast model for tests.
TINY = {
    "channels": [4, 8],
    "norm": "group",
    "epochs": 3,
    "batch_size": 4,
    "learning_rate": 3e-3,
    "warmup_epochs": 0,
    "device": "cpu",
    "num_threads": 1,
}
