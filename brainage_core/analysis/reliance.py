"""What the predictor reads: counterfactual reliance on each planted age effect.

Localisation scores compare a map with the voxels where the *data* carry age. A faithful
map shows what the *model* uses, which can be less: when several effects all follow
biological age, a network may read only the easiest one. This module measures the model
side directly, on a synthetic cohort, without any importance map.

Each chosen subject is re-rendered by the generator with exactly the same anatomy, scanner
and noise, once as it is and once per effect with that effect alone aged by ``delta``
years. The images go through the same preprocessing as the cohort, and the predictor's
shift tells how much it relies on each effect. A model that ignores an effect shifts by
0; the shifts of all effects add up to roughly the shift when everything ages together.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from brainage_core._utils.torch import model_device, predict_batch
from brainage_core._utils.validation import BrainAgeInputError, check_positive
from brainage_core.data.preprocess import preprocess_image
from brainage_core.data.synth.ages import PARTICIPANT_COLUMNS, regional_age_column
from brainage_core.data.synth.cohort import read_cohort_config
from brainage_core.data.synth.config import SynthConfig
from brainage_core.data.synth.render import AgeingModel, SubjectRenderer
from brainage_core.data.template import Template

#: Columns of the table returned by :func:`effect_reliance`.
RELIANCE_COLUMNS = (
    "effect",
    "kind",
    "regions",
    "delta_years",
    "mean_shift",
    "sd_shift",
    "shift_per_year",
    "share",
    "n_subjects",
)


def effect_reliance(
    predictor: nn.Module,
    dataset_root: str | os.PathLike,
    template: Template,
    participant_ids: Sequence[str],
    *,
    delta: float = 10.0,
    progress: bool = True,
) -> pd.DataFrame:
    """Shift of the predictor's output when one planted effect alone ages by ``delta``.

    Parameters
    ----------
    predictor : torch.nn.Module
        The trained brain-age model (left unchanged, evaluated in eval mode).
    dataset_root : str or os.PathLike
        A cohort written by :func:`brainage_core.data.synth.cohort.generate_cohort`.
    template : Template
        The grid the predictor works on (the prepared cohort's template); the
        counterfactual images are preprocessed onto it like every cohort image.
    participant_ids : sequence of str
        Subjects of the cohort to re-render (for example the test split).
    delta : float, default=10.0
        Years by which each effect is aged.
    progress : bool, default=True
        Show a progress bar.

    Returns
    -------
    pandas.DataFrame
        One row per effect, plus a row ``effect="all"`` with every effect aged together:
        ``kind``, ``regions``, ``delta_years``, ``mean_shift`` and ``sd_shift`` (years, over
        subjects), ``shift_per_year`` (``mean_shift / delta``) and ``share`` (the effect's
        part of the summed single-effect shifts).
    """
    check_positive("delta", delta)
    root = Path(dataset_root)
    config = read_cohort_config(root)
    if not participant_ids:
        raise BrainAgeInputError("'participant_ids' must name at least one subject.")
    rows = _participants(root, config, participant_ids)
    renderer = SubjectRenderer(AgeingModel(config))
    n_effects = len(config.effects)
    # Scenario 0: as generated; 1..K: effect k aged by delta; K+1: every effect aged.
    shifts = np.zeros((n_effects + 1, len(rows)))
    quiet = {} if progress else {"disable": True}  # else TQDM_DISABLE=1 silences it
    bar = tqdm(rows, desc="effect reliance", unit="subject", **quiet)
    for j, (index, sex, ages) in enumerate(bar):
        scenarios = [ages]
        for k in range(n_effects):
            aged = list(ages)
            aged[k] += delta
            scenarios.append(aged)
        scenarios.append([a + delta for a in ages])
        images = [_prepared(renderer, template, index, sex, a) for a in scenarios]
        with torch.no_grad():
            x = torch.from_numpy(np.stack(images)[:, None]).to(model_device(predictor))
            pred = predict_batch(predictor, x).cpu().numpy()
        shifts[:, j] = pred[1:] - pred[0]
    single = shifts[:n_effects].mean(axis=1)
    total = float(np.abs(single).sum())
    out = []
    for k, effect in enumerate(config.effects):
        out.append(_row(str(k + 1), effect.kind, ";".join(effect.regions), shifts[k], delta, total))
    out.append(_row("all", "all", "", shifts[n_effects], delta, total))
    return pd.DataFrame(out, columns=list(RELIANCE_COLUMNS))


def _row(
    effect: str, kind: str, regions: str, shift: np.ndarray, delta: float, total: float
) -> dict[str, Any]:
    mean = float(shift.mean())
    return {
        "effect": effect,
        "kind": kind,
        "regions": regions,
        "delta_years": float(delta),
        "mean_shift": mean,
        "sd_shift": float(shift.std()),
        "shift_per_year": mean / delta,
        "share": abs(mean) / total if total > 0 and effect != "all" else float("nan"),
        "n_subjects": int(shift.size),
    }


def _participants(
    root: Path, config: SynthConfig, participant_ids: Sequence[str]
) -> list[tuple[int, str, list[float]]]:
    """(cohort index, sex, regional ages) of each requested participant."""
    table = pd.read_csv(root / "participants.tsv", sep="\t")
    missing = [c for c in PARTICIPANT_COLUMNS if c not in table.columns]
    if missing:
        raise BrainAgeInputError(f"participants.tsv lacks the column(s) {missing}.", root)
    regional_path = root / "derivatives" / "ground_truth" / "regional_ages.tsv"
    columns = [regional_age_column(k) for k in range(len(config.effects))]
    if regional_path.is_file():
        regional = pd.read_csv(regional_path, sep="\t")
        table = table.merge(regional, on="participant_id", how="left", validate="one_to_one")
    else:  # cohorts from before regional heterogeneity: every region ages at b
        for c in columns:
            table[c] = table["biological_age"]
    position = {pid: i for i, pid in enumerate(table["participant_id"])}
    unknown = [p for p in participant_ids if p not in position]
    if unknown:
        raise BrainAgeInputError(
            f"participant(s) {unknown[:5]} are not in the cohort's participants.tsv.", root
        )
    out = []
    for pid in participant_ids:
        i = position[pid]
        row = table.iloc[i]
        out.append((i, str(row["sex"]), [float(row[c]) for c in columns]))
    return out


def _prepared(
    renderer: SubjectRenderer, template: Template, index: int, sex: str, ages: list[float]
) -> np.ndarray:
    """Render one counterfactual and preprocess it exactly like a cohort image."""
    image = renderer.render_subject(index, sex, ages)
    img = renderer.model.template.to_image(image)
    return preprocess_image(img, template).astype(np.float32)
