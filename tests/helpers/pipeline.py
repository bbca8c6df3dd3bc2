"""Fixtures of the pipeline and book tests: a small run folder with plausible artefacts.

:func:`make_fake_run` writes what the study's data, training and map notebooks leave in a
run folder (config, population map, region and prediction tables, metrics) without
training anything, so that the visualisation notebook and the book can be exercised in
seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from brainage_core._utils.io import save_nifti, write_table
from brainage_core.data.template import load_template
from brainage_core.pipeline.runner import prepare_run_dir
from brainage_core.study.config import load_config
from brainage_core.study.rundir import RunDir


def make_fake_run(run_dir: Path, *, resolution: int = 8, seed: int = 0) -> RunDir:
    """Write a run folder with a population map peaking in one blob, and tables."""
    rng = np.random.default_rng(seed)
    config = load_config("quick", overrides=[("data.resolution", resolution)], validate=False)
    run = prepare_run_dir(config, run_dir)
    template = load_template(resolution)
    grid = np.indices(template.shape).astype(np.float32)
    centre = np.array(template.shape, dtype=np.float32)[:, None, None, None] * np.array(
        [0.4, 0.5, 0.5], dtype=np.float32)[:, None, None, None]
    blob = np.exp(-((grid - centre) ** 2).sum(0) / (2 * 2.0**2))
    importance = (0.2 * rng.random(template.shape) + blob) * template.mask
    save_nifti(template.to_image(importance.astype(np.float32)),
               run.maps / "population_importance.nii.gz")
    write_table(run.tables / "regions.csv", pd.DataFrame({
        "name": ["Left Hippocampus", "Right Lateral Ventricle", "Left Putamen"],
        "mean_importance": [0.9, 0.7, 0.2],
        "volume_ml": [4.1, 8.0, 5.2],
    }))
    n = 30
    ages = rng.uniform(45, 82, n)
    predicted = ages + rng.normal(0, 3, n)
    write_table(run.tables / "predictions.csv", pd.DataFrame({
        "participant_id": [f"sub-{i:04d}" for i in range(n)],
        "age": ages.round(2),
        "split": np.where(np.arange(n) < 20, "train", "test"),
        "predicted_age": predicted.round(2),
        "gap": (predicted - ages).round(2),
    }))
    run.update_metrics("prediction", {"test_mae": 2.5})
    return run
