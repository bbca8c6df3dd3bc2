"""Evaluation of a brain-age predictor: predictions, metrics and the brain-age gap.

The brain-age gap is ``predicted - age``. Because regression towards the mean makes it
depend on age, it is also reported bias-corrected: fit ``(pred - age) = a * age + b`` on the
validation subjects, then ``gap_corrected = pred - (a * age + b) - age`` everywhere.

The correction uses the true age, so the mean absolute corrected gap is **not an accuracy**:
a model that predicts one constant age has a slope ``a`` of -1, and its "corrected" gap is
then nearly zero. ``metrics.json`` therefore keeps it under the name
``test_corrected_gap_mean_abs`` (the old name ``test_mae_corrected`` is gone), always
beside the uncorrected ``test_mae``, with the slope ``bias_slope`` and the flag
``bias_slope_near_minus_one`` (slope below :data:`CONSTANT_SLOPE`).

**Did the predictor learn?** :func:`prediction_metrics` compares the validation MAE with the
MAE of predicting the training subjects' mean age for every validation subject; a predictor
whose MAE is not below :data:`LEARNED_MARGIN` times that reference is recorded as
``learned: false``, and :func:`learning_warning` says so in words.

On a synthetic cohort the planted truth gives three more figures: the oracle MAE (the
irreducible error of the generator), the correlation of the corrected gap with the true
planted gap, and the AUC with which the corrected gap separates the accelerated-ageing
group from the controls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, Dataset

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.data.datasets import CohortDataset
from brainage_core.data.protocol import Cohort
from brainage_core.models.distributed import resolve_num_workers

#: A predictor "learned" if its validation MAE is below this fraction of the MAE of
#: predicting the training mean age.
LEARNED_MARGIN = 0.8

#: A bias slope below this value means the predictions barely depend on age (a constant
#: predictor has slope -1): the bias-corrected gap is then meaningless.
CONSTANT_SLOPE = -0.8


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    data: Any,
    *,
    split: str | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    channels_last: bool = False,
    amp_dtype: torch.dtype | None = None,
    num_workers: int | str = 0,
) -> np.ndarray:
    """Predict ages (years) for every item of a dataset or every subject of a cohort.

    Parameters
    ----------
    model : torch.nn.Module
        A predictor whose forward returns ages of shape ``(N,)``.
    data : CohortDataset or PreparedCohort
        A dataset of ``(x, age)`` items, or a cohort (wrapped in a
        :class:`~brainage_core.data.datasets.CohortDataset` without augmentation).
    split : {"train", "val", "test"} or None, default=None
        With a cohort: predict only this split (None: every subject, in cache order).
    batch_size : int, default=32
        Subjects per forward pass.
    device : str or torch.device or None, default=None
        Where to compute (None: where the model's parameters are).
    channels_last : bool, default=False
        Feed inputs in the ``channels_last_3d`` memory format.
    amp_dtype : torch.dtype or None, default=None
        Autocast dtype on CUDA (None: full precision). Outputs are cast to float32.
    num_workers : int or "auto", default=0
        DataLoader worker processes reading the volumes, converting them to float32 and
        batching them; on CUDA the batches go through pinned memory. ``"auto"``: none on
        the CPU, some on CUDA (:func:`~brainage_core.models.distributed.resolve_num_workers`).

    Returns
    -------
    numpy.ndarray of float64, shape (n_items,)
        Predicted ages in dataset order. The model's train/eval mode is restored.
    """
    if not isinstance(data, Dataset):
        data = CohortDataset(data, split=split)
    elif split is not None:
        raise BrainAgeInputError("'split' only applies when a cohort is given, not a dataset.")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    num_workers = resolve_num_workers(num_workers, device)
    was_training = model.training
    model.eval()
    out = []
    try:
        loader = DataLoader(data, batch_size=batch_size, shuffle=False,
                            num_workers=num_workers, pin_memory=device.type == "cuda")
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out.append(model(x).float().cpu())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros(0)
    return torch.cat(out).numpy().astype(np.float64)


def regression_metrics(age: Any, pred: Any) -> dict[str, float]:
    """MAE, RMSE, Pearson r and R² of predicted against true ages.

    Parameters
    ----------
    age, pred : array-like of shape (n,)
        True and predicted ages in years.

    Returns
    -------
    dict
        ``mae``, ``rmse``, ``r``, ``r2`` (NaN where undefined, e.g. fewer than 2 subjects).
    """
    age, pred = _pair(age, pred)
    if age.size == 0:
        return {"mae": math.nan, "rmse": math.nan, "r": math.nan, "r2": math.nan}
    err = pred - age
    ss_tot = float(np.sum((age - age.mean()) ** 2))
    r = math.nan
    if age.size > 1 and np.std(age) > 0 and np.std(pred) > 0:
        r = float(np.corrcoef(age, pred)[0, 1])
    return {
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "r": r,
        "r2": 1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else math.nan,
    }


@dataclass(frozen=True)
class BiasCorrection:
    """Linear age-bias model of the brain-age gap: ``pred - age = slope * age + intercept``.

    Attributes
    ----------
    slope, intercept : float
        Fitted coefficients (on validation subjects).
    """

    slope: float
    intercept: float

    @classmethod
    def fit(cls, age: Any, pred: Any) -> BiasCorrection:
        """Least-squares fit of ``pred - age`` on ``age``.

        Parameters
        ----------
        age, pred : array-like of shape (n,)
            True and predicted ages of the fitting subjects (at least 2 distinct ages).
        """
        age, pred = _pair(age, pred)
        if age.size < 2 or np.ptp(age) == 0:
            raise BrainAgeInputError(
                f"bias correction needs at least 2 subjects with different ages; "
                f"{age.size} subject(s) with age range {np.ptp(age) if age.size else 0} "
                "were provided."
            )
        slope, intercept = np.polyfit(age, pred - age, deg=1)
        return cls(float(slope), float(intercept))

    def corrected_prediction(self, age: Any, pred: Any) -> np.ndarray:
        """Bias-corrected predicted age: ``pred - (slope * age + intercept)``."""
        age, pred = _pair(age, pred)
        return pred - (self.slope * age + self.intercept)

    def corrected_gap(self, age: Any, pred: Any) -> np.ndarray:
        """Bias-corrected gap: ``pred - (slope * age + intercept) - age``."""
        age, pred = _pair(age, pred)
        return self.corrected_prediction(age, pred) - age


def gap_auc(gap: Any, group: Any, positive: str = "accelerated") -> float:
    """AUC with which a larger gap flags the ``positive`` group.

    Parameters
    ----------
    gap : array-like of shape (n,)
        Brain-age gaps (larger = older-looking brain).
    group : array-like of shape (n,)
        Group labels.
    positive : str, default="accelerated"
        Label of the positive group.

    Returns
    -------
    float
        ROC AUC (0.5 = chance); NaN if only one class is present.
    """
    gap = np.asarray(gap, dtype=float)
    labels = np.asarray(group) == positive
    if labels.all() or not labels.any():
        return math.nan
    return float(roc_auc_score(labels, gap))


def prediction_table(cohort: Cohort, predicted_age: Any) -> tuple[pd.DataFrame, BiasCorrection]:
    """Predictions of every subject with raw and bias-corrected gaps.

    Parameters
    ----------
    cohort : PreparedCohort
        The cohort (its ``table`` gives ``participant_id``, ``age``, ``split`` and, on
        synthetic data, the true ``gap`` and ``group``).
    predicted_age : array-like of shape (len(cohort),)
        Predicted ages in cache order.

    Returns
    -------
    table : pandas.DataFrame
        Columns ``participant_id``, ``age``, ``sex``, ``site``, ``split``,
        ``predicted_age``, ``gap`` (predicted - age), ``predicted_age_corrected``,
        ``gap_corrected`` and, where known, ``true_gap`` and ``group``.
    correction : BiasCorrection
        The correction, fitted on the validation subjects.
    """
    src = cohort.table
    pred = np.asarray(predicted_age, dtype=float)
    if pred.shape != (len(src),):
        raise BrainAgeInputError(
            f"'predicted_age' must hold one value per subject ({len(src)}); "
            f"shape {pred.shape} was provided."
        )
    keep = [c for c in ("participant_id", "session", "run", "age", "sex", "site", "split")
            if c in src]
    table = src[keep].copy().reset_index(drop=True)
    age = table["age"].to_numpy(dtype=float)
    val = table["split"].to_numpy() == "val"
    correction = BiasCorrection.fit(age[val], pred[val])
    table["predicted_age"] = pred
    table["gap"] = pred - age
    table["predicted_age_corrected"] = correction.corrected_prediction(age, pred)
    table["gap_corrected"] = correction.corrected_gap(age, pred)
    if "gap" in src:
        table["true_gap"] = src["gap"].to_numpy(dtype=float)
    if "group" in src:
        table["group"] = src["group"].to_numpy()
    return table, correction


def prediction_metrics(
    table: pd.DataFrame,
    correction: BiasCorrection,
    *,
    oracle_mae: float | None = None,
    baseline_column: str = "baseline_predicted_age",
) -> dict[str, Any]:
    """The ``prediction`` section of ``metrics.json`` from a :func:`prediction_table`.

    Parameters
    ----------
    table : pandas.DataFrame
        Output of :func:`prediction_table`.
    correction : BiasCorrection
        The fitted bias correction.
    oracle_mae : float or None, default=None
        Irreducible MAE of a synthetic cohort (``cohort.metadata["oracle_mae"]``).
    baseline_column : str, default="baseline_predicted_age"
        Column of the table holding the baseline's predictions, if any.

    Returns
    -------
    dict
        ``test_mae`` (uncorrected: the accuracy), ``test_rmse``, ``test_r``, ``test_r2``,
        ``train_mae``, ``val_mae``, ``mean_predictor_val_mae`` (the validation MAE of
        predicting the training mean age), ``learned`` (``val_mae`` below
        :data:`LEARNED_MARGIN` times that), ``test_corrected_gap_mean_abs`` (mean absolute
        bias-corrected gap: not an accuracy, see the module docstring), ``bias_slope``,
        ``bias_intercept``, ``bias_slope_near_minus_one``,
        ``n_train``/``n_val``/``n_test`` and, where the truth is known, ``oracle_mae``,
        ``ratio_test_oracle``, ``gap_corr_true_gap``, ``gap_auc_accelerated`` (on the test
        subjects); with baseline predictions, ``baseline_mae`` and ``ratio_test_baseline``.
        Undefined values are None, so the dict is valid JSON.
    """
    out: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        part = table[table["split"] == split]
        out[f"n_{split}"] = int(len(part))
        m = regression_metrics(part["age"], part["predicted_age"])
        if split == "test":
            out.update({f"test_{k}": v for k, v in m.items()})
            out["test_corrected_gap_mean_abs"] = float(np.mean(np.abs(part["gap_corrected"])))
            out["test_gap_mean"] = float(np.mean(part["gap"]))
            out["test_gap_corrected_mean"] = float(np.mean(part["gap_corrected"]))
        else:
            out[f"{split}_mae"] = m["mae"]
    train_mean = float(table.loc[table["split"] == "train", "age"].mean())
    val_age = table.loc[table["split"] == "val", "age"].to_numpy(dtype=float)
    reference = float(np.mean(np.abs(val_age - train_mean))) if val_age.size else math.nan
    out["mean_predictor_val_mae"] = reference
    out["learned"] = bool(
        math.isfinite(reference) and out["val_mae"] < LEARNED_MARGIN * reference
    )
    out["bias_slope"] = correction.slope
    out["bias_intercept"] = correction.intercept
    out["bias_slope_near_minus_one"] = bool(correction.slope < CONSTANT_SLOPE)
    test = table[table["split"] == "test"]
    if oracle_mae is not None:
        out["oracle_mae"] = float(oracle_mae)
        out["ratio_test_oracle"] = out["test_mae"] / float(oracle_mae)
    if baseline_column in test:
        out["baseline_mae"] = regression_metrics(test["age"], test[baseline_column])["mae"]
        out["ratio_test_baseline"] = out["test_mae"] / out["baseline_mae"]
    if "true_gap" in test and len(test) > 1:
        tg, gc = test["true_gap"].to_numpy(float), test["gap_corrected"].to_numpy(float)
        ok = np.std(tg) > 0 and np.std(gc) > 0
        out["gap_corr_true_gap"] = float(np.corrcoef(tg, gc)[0, 1]) if ok else math.nan
    if "group" in test:
        out["gap_auc_accelerated"] = gap_auc(test["gap_corrected"], test["group"])
    return {k: _json_number(v) for k, v in out.items()}


def learning_warning(metrics: dict[str, Any]) -> str | None:
    """A warning in words if the predictor did not learn, else None.

    Parameters
    ----------
    metrics : dict
        The ``prediction`` section of ``metrics.json`` (from :func:`prediction_metrics`).

    Returns
    -------
    str or None
        The warning for a run with ``learned: false`` or a bias slope near -1; None for a
        run that learned (or an older run whose metrics lack these keys).
    """
    lines = []
    if metrics.get("learned") is False:
        lines.append(
            f"The predictor did not learn: its validation MAE ({_years(metrics.get('val_mae'))}) "
            f"is not below {LEARNED_MARGIN:g} x the MAE of predicting the training mean age "
            f"({_years(metrics.get('mean_predictor_val_mae'))}). Its importance maps would "
            "explain a model that knows nothing about age; the map steps refuse to run "
            "unless maps.allow_untrained_predictor is true."
        )
    if metrics.get("bias_slope_near_minus_one"):
        lines.append(
            f"The bias slope is {metrics.get('bias_slope', float('nan')):.2f}, near -1: the "
            "predictions barely depend on age, so the bias-corrected gap "
            "(test_corrected_gap_mean_abs) says nothing about accuracy."
        )
    return " ".join(lines) or None


def _years(value: Any) -> str:
    return f"{value:.2f} y" if isinstance(value, (int, float)) else "n/a"


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _pair(age: Any, pred: Any) -> tuple[np.ndarray, np.ndarray]:
    age = np.asarray(age, dtype=float).reshape(-1)
    pred = np.asarray(pred, dtype=float).reshape(-1)
    if age.shape != pred.shape:
        raise BrainAgeInputError(
            f"'age' and 'pred' must have the same length; {age.size} and {pred.size} "
            "were provided."
        )
    return age, pred
