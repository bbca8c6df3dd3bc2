"""A small CNN beats the voxel-wise ridge baseline when anatomy varies (issue 11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from brainage_core.data.cohort import load_cohort
from brainage_core.models.baseline import fit_ridge_baseline
from brainage_core.models.evaluation import (
    predict,
    prediction_metrics,
    prediction_table,
    regression_metrics,
)
from brainage_core.models.training import TrainConfig, cohort_datasets, train_predictor

#: A tiny cohort whose only age signal is a change of size: the lateral ventricles expand
#: (a deformation of up to about 20 mm at 82 years, linear in age after 40), while the
#: anatomy varies strongly between subjects: a misregistration of 16 mm and 6 degrees per
#: axis (standard deviations) moves the ventricles by about two voxels of the 8 mm grid,
#: and smooth deformations (2 mm coarse, 1 mm local) change their shape. Intensity
#: nuisance (bias, contrast, scale, noise), regional heterogeneity and the accelerated
#: group are nearly off, so what separates the two models is the anatomy. 280 subjects
#: split 120/40/120.
VARIABLE_ANATOMY = {
    "n_subjects": 280,
    "resolution": 8,
    "render_resolution": 8,
    "seed": 1,
    "effects": [{"kind": "ventricle_expansion", "regions": ["Lateral Ventricle"],
                 "strength": 20.0, "onset": 40.0, "form": "linear"}],
    "translation_mm": 16.0,
    "rotation_deg": 6.0,
    "deformation_mm": 2.0,
    "local_deformation_mm": 1.0,
    "head_size_sd": 0.03,
    "bias_field_sd": 0.02,
    "contrast_sd": 0.02,
    "scale_sd": 0.02,
    "noise_sd": 0.01,
    "regional_sd": 0.0,
    "sigma_gap": 1.0,
    "accelerated_fraction": 0.0,
}

#: A three-block CNN with the global average pool (it measures the ventricles wherever
#: they sit), trained for 30 epochs with 1-voxel shifts and left-right flips (the
#: expansion is bilateral); about 5,000 weights against the ridge's 1,000-8,000.
RECIPE = {
    "channels": [8, 16, 32],
    "pool": "avg",
    "norm": "batch",
    "batchnorm_recalibration": 64,
    "loss": "mse",
    "epochs": 30,
    "batch_size": 4,
    "learning_rate": 3e-3,
    "warmup_epochs": 0,
    "augment": {"shift": 1, "flip": True},
    "seed": 0,
    "device": "cpu",
    "num_threads": 1,
}


@pytest.mark.slow
def test_cnn_beats_voxelwise_ridge_when_anatomy_varies(tmp_path: Path) -> None:
    """A CNN with global pooling follows a structure that moves; ridge on voxels cannot.

    Issue 11: a linear model on voxels nearly matched the CNN because every subject's
    structures sat at nearly the same voxels, so the age signal was a fixed linear
    pattern of intensities. Here the only age signal is the size of the lateral
    ventricles, and each subject's ventricles sit about two voxels away from the next
    subject's (misregistration and smooth deformations, see :data:`VARIABLE_ANATOMY`).
    A voxel's intensity then says as much about where the ventricle boundary lies as
    about how far it has moved with age, so a ridge regression on voxels has to learn a
    broad, blurred weight map from 120 subjects. The CNN detects the ventricles
    locally and averages the detections over the whole grid (``pool: avg``), which
    measures their size wherever they sit.

    The test generates the cohort with the project's generator, trains the project's
    predictor and fits the ridge baseline (the figure of the predict step, at both
    downsampling factors) on the same split, and requires a CNN that learned (test MAE
    below half that of predicting the training mean age) and a test MAE of at most 0.75
    times the better ridge's. Measured (idle, session 8; 360 subjects split 120/40/200,
    cohort seeds 1-5): CNN 3.65-5.06 y against ridge 7.46-8.92 y, ratios 0.45-0.65; this
    test's cohort (seed 1, 280 subjects) gives 3.82 y against 7.31 y (0.52). With the same
    ageing and no misregistration or deformation, ridge beats the CNN (1.21 against
    1.85 y on seed 1): it is the moving anatomy that defeats the linear model, not the
    ageing itself. With half this misregistration (8 mm, 3 degrees) the two were close
    on a 200-subject test split (CNN 3.66 y, ridge 3.51 y), so the margin here comes
    from the physics, not from a lucky seed.
    """
    cohort = load_cohort(
        {"source": "synthetic", "resolution": 8, "cache_dir": str(tmp_path / "cache"),
         "split_fractions": [3 / 7, 1 / 7, 3 / 7], "synthetic": VARIABLE_ANATOMY},
        progress=False, n_jobs=1)
    cfg = TrainConfig.from_dict(RECIPE)
    data = cohort_datasets(cohort, cfg)
    result = train_predictor(cfg, data["train"], data["val"], progress=False)
    table, correction = prediction_table(cohort, predict(result.model, cohort))
    ridge = {factor: fit_ridge_baseline(cohort, factor=factor).predict(cohort)
             for factor in sorted({1, cfg.baseline_downsample})}
    table["baseline_predicted_age"] = ridge[cfg.baseline_downsample]  # the predict step's
    metrics = prediction_metrics(table, correction)
    age = cohort.table["age"].to_numpy(dtype=float)
    test = cohort.indices("test")
    ridge_mae = {f: regression_metrics(age[test], p[test])["mae"] for f, p in ridge.items()}
    mean_age_mae = float(np.mean(np.abs(age[test] - age[cohort.indices("train")].mean())))
    figures = (f"CNN {metrics['test_mae']:.2f} y, ridge by downsampling factor "
               f"{ {f: round(m, 2) for f, m in ridge_mae.items()} }, "
               f"training mean age {mean_age_mae:.2f} y")
    assert metrics["learned"], figures
    assert metrics["test_mae"] < 0.5 * mean_age_mae, figures
    assert metrics["test_mae"] <= 0.75 * min(ridge_mae.values()), figures
