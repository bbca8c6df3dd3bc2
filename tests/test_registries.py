"""Extending the study is one new module plus one registry line.

Each test adds a toy entry to a registry (restored afterwards) and uses it through the
study's own entry points, untouched: the config validation, the training loop and its
checkpoints, the data path, the attribution surface.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from helpers.data import RES, make_bids
from helpers.predictor import TINY, FakeCohort
from torch import nn

from brainage_core.data.cohort import load_cohort
from brainage_core.data.sources import SOURCES, DataSource, SourceRequest
from brainage_core.data.sources.bids import load_bids
from brainage_core.explain.captum import CAPTUM_METHODS, CaptumExplainer
from brainage_core.models.registry import ARCHITECTURES
from brainage_core.models.training import (
    TrainConfig,
    cohort_datasets,
    load_predictor,
    train_predictor,
)
from brainage_core.study.maps import MapsConfig


class MeanIntensityRegressor(nn.Module):
    """A toy architecture: age from the mean intensity (an affine map of one number)."""

    def __init__(self, *, age_mean: float, age_std: float, **_: object) -> None:
        super().__init__()
        self.config = {"age_mean": age_mean, "age_std": age_std}
        self.linear = nn.Linear(1, 1)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1).mean(1, keepdim=True))[:, 0]

    def loss(self, raw: torch.Tensor, age: torch.Tensor, kind: str = "mae") -> torch.Tensor:
        target = (age - self.config["age_mean"]) / self.config["age_std"]
        error = raw - target
        return error.abs().mean() if kind == "mae" else error.pow(2).mean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.raw(x) * self.config["age_std"] + self.config["age_mean"]


def test_a_new_architecture_trains_and_reloads_by_name(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(ARCHITECTURES, "mean_intensity", MeanIntensityRegressor)
    cohort = FakeCohort(n=24, seed=1)
    config = TrainConfig.from_dict({**TINY, "architecture": "mean_intensity", "epochs": 2})
    data = cohort_datasets(cohort, config)
    result = train_predictor(config, data["train"], data["val"],
                             checkpoint=tmp_path / "predictor.pt", progress=False)
    assert isinstance(result.model, MeanIntensityRegressor)
    reloaded = load_predictor(tmp_path / "predictor.pt")  # the checkpoint names the class
    assert isinstance(reloaded, MeanIntensityRegressor)
    x = torch.from_numpy(cohort.image(0))[None, None]
    torch.testing.assert_close(reloaded(x), result.model.eval()(x))


def test_a_new_captum_method_is_a_function_and_a_line(monkeypatch):
    def toy_gradient_sign(model, x, opts):
        x = x.clone().requires_grad_(True)
        model(x).sum().backward()
        return x.grad.sign()

    monkeypatch.setitem(CAPTUM_METHODS, "gradient_sign", toy_gradient_sign)
    assert MapsConfig.from_dict({"baselines": ["gradient_sign"]}).baselines == ["gradient_sign"]
    model = MeanIntensityRegressor(age_mean=60.0, age_std=10.0)
    x = torch.rand(2, 1, 4, 4, 4)
    importance = CaptumExplainer(model, "gradient_sign").attribute(x)
    assert importance.shape == x.shape
    # d(mean)/dx is positive everywhere: |sign| = 1 on every voxel
    torch.testing.assert_close(importance, torch.ones_like(x))


def test_a_new_data_source_feeds_the_same_path(monkeypatch, tmp_path: Path):
    bids = make_bids(tmp_path / "bids", n=6)

    def from_table(request: SourceRequest) -> pd.DataFrame:
        """A toy source: a BIDS folder whose ages are given in months."""
        manifest = load_bids(request.path)
        manifest["age"] = np.round(manifest["age"] * 12) / 12
        return manifest

    monkeypatch.setitem(SOURCES, "months", DataSource(
        name="months", description="a toy source", needs_path=True, manifest=from_table))
    cohort = load_cohort({"source": "months", "path": str(bids), "resolution": RES,
                          "cache_dir": str(tmp_path / "cache")}, progress=False, n_jobs=1)
    assert len(cohort) == 6
    assert cohort.metadata["resolution"] == RES
