"""Counterfactual reliance of a predictor on each planted effect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.analysis.reliance import RELIANCE_COLUMNS, effect_reliance
from brainage_core.data.atlas import load_atlas
from brainage_core.data.synth.cohort import load_ground_truth
from brainage_core.data.template import load_template


class RegionReader(nn.Module):
    """A 'predictor' that only reads mean intensity inside one mask (darker = older)."""

    def __init__(self, mask: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mask", torch.from_numpy(mask.astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = (x[:, 0] * self.mask).sum(dim=(1, 2, 3)) / self.mask.sum()
        return -100.0 * inside


def _participants(root: Path) -> list[str]:
    return list(pd.read_csv(root / "participants.tsv", sep="\t")["participant_id"][:3])


def test_a_model_reading_one_region_relies_on_that_effect_only(tiny_cohort: Path) -> None:
    template = load_template(8)
    hippocampus = load_atlas(8).region_mask(["Hippocampus"]) & template.mask
    effects = load_ground_truth(tiny_cohort).effects
    table = effect_reliance(
        RegionReader(hippocampus),
        tiny_cohort,
        template,
        _participants(tiny_cohort),
        delta=10.0,
        progress=False,
    )
    assert list(table.columns) == list(RELIANCE_COLUMNS)
    assert list(table["effect"]) == [str(k + 1) for k in range(len(effects))] + ["all"]
    by_kind = table.set_index("kind")
    # Hippocampal atrophy darkens the region: the reader's output rises.
    assert by_kind.loc["atrophy", "mean_shift"] > 0.5
    assert by_kind.loc["atrophy", "share"] > 0.8
    # Cortical thinning does not touch the hippocampus.
    assert (
        abs(by_kind.loc["cortical_thinning", "mean_shift"])
        < 0.1 * by_kind.loc["atrophy", "mean_shift"]
    )
    assert by_kind.loc["atrophy", "shift_per_year"] == pytest.approx(
        by_kind.loc["atrophy", "mean_shift"] / 10.0
    )
    assert (table["n_subjects"] == 3).all()


def test_a_model_blind_to_the_image_relies_on_nothing(tiny_cohort: Path) -> None:
    class Constant(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.shape[0],), 60.0) + 0 * x.sum()

    table = effect_reliance(
        Constant(), tiny_cohort, load_template(8), _participants(tiny_cohort), progress=False
    )
    assert np.allclose(table["mean_shift"], 0.0)
    assert table["share"].isna().all()  # nothing to share out


def test_unknown_participants_and_foreign_folders_are_named(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    reader = RegionReader(load_template(8).mask)
    with pytest.raises(BrainAgeInputError, match="sub-9999"):
        effect_reliance(reader, tiny_cohort, load_template(8), ["sub-9999"], progress=False)
    with pytest.raises(BrainAgeInputError, match="dataset_description.json"):
        effect_reliance(reader, tmp_path, load_template(8), ["sub-0001"], progress=False)
    with pytest.raises(BrainAgeInputError, match="'delta'"):
        effect_reliance(
            reader, tiny_cohort, load_template(8), ["sub-0001"], delta=0, progress=False
        )


def test_the_map_step_records_reliance_in_the_run(tmp_path: Path) -> None:
    from brainage_core.data.cohort import load_cohort
    from brainage_core.study import average, maps
    from brainage_core.study.maps import MapsConfig
    from brainage_core.study.rundir import RunDir

    data = {
        "source": "synthetic",
        "resolution": 8,
        "cache_dir": str(tmp_path / "cache"),
        "synthetic": {"n_subjects": 12, "resolution": 8, "seed": 1},
    }
    cohort = load_cohort(data, progress=False)
    hippocampus = load_atlas(8).region_mask(["Hippocampus"]) & cohort.mask
    study = maps.MapsStudy(
        run=RunDir(tmp_path / "run"),
        config={"data": data},
        settings=MapsConfig(reliance_subjects=2, reliance_delta=5.0),
        cohort=cohort,
        predictor=RegionReader(hippocampus),
    )
    table = average.model_reliance(study, progress=False)
    assert table is not None and (table["n_subjects"] == 2).all()
    written = pd.read_csv(study.run.table("effect_reliance"))
    assert list(written["kind"]) == list(table["kind"])
    reliance = study.run.read_metrics()["reliance"]
    assert reliance["delta_years"] == 5.0 and reliance["n_subjects"] == 2
    assert reliance["share"]["atrophy"] > 0.8
    assert set(reliance["share"]) == {"ventricle_expansion", "atrophy", "cortical_thinning"}
    # Switched off: nothing is measured or written.
    study.settings = MapsConfig(reliance_subjects=0)
    assert average.model_reliance(study, progress=False) is None
