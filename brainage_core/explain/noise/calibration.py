"""Choosing lambda: the most perturbation the predictor tolerates.

The weight lambda of the noise term sets how much the noise model may perturb. Too
small, and B stays low everywhere (the map says everything matters); too large, and the
perturbation destroys the prediction (the map no longer describes the model at work).
:func:`calibrate_lambda` trains one noise model per candidate lambda, each from the same
initial weights, and keeps the largest lambda for which the predictor's mean shift
``|f(x~) - f(x)|`` on perturbed *validation* images stays within ``tolerance`` years. The
shift is what lambda controls; the MAE against the true age mixes in the model's own
error (noise can move a wrong prediction toward the truth), so it is only reported. The
whole trade-off curve is returned, so it can be shown and reported.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from brainage_core._utils.validation import BrainAgeInputError, check_positive
from brainage_core.explain.noise.amortised import NoiseMapExplainer
from brainage_core.explain.noise.objective import as_dataset
from brainage_core.explain.noise.settings import NoiseSettings, resolve_settings
from brainage_core.explain.noise.settings import field_names as noise_field_names

#: Default candidate values of lambda (a log-spaced grid).
DEFAULT_LAMBDAS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


@dataclass
class CalibrationResult:
    """Outcome of :func:`calibrate_lambda`.

    Attributes
    ----------
    lam : float
        The chosen lambda.
    tolerance : float
        The allowed rise of the validation MAE, in years.
    curve : pandas.DataFrame
        One row per candidate: ``lam``, ``clean_mae``, ``noisy_mae``, ``mae_rise``,
        ``shift`` (mean ``|f(x~) - f(x)|``), ``mean_b``, ``mean_sigma``,
        ``within_tolerance`` and ``chosen``.
    explainer : NoiseMapExplainer
        The noise model trained with the chosen lambda.
    """

    lam: float
    tolerance: float
    curve: pd.DataFrame
    explainer: NoiseMapExplainer


def calibrate_lambda(
    predictor: nn.Module,
    train_data: Any,
    val_data: Any,
    *,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    tolerance: float = 1.0,
    settings: NoiseSettings | None = None,
    explainer_kwargs: dict[str, Any] | None = None,
    fit_kwargs: dict[str, Any] | None = None,
    n_draws: int = 2,
    warm_start: bool = False,
    progress: bool = True,
) -> CalibrationResult:
    """Pick the largest lambda whose validation shift stays within ``tolerance``.

    Parameters
    ----------
    predictor : torch.nn.Module
        The trained (frozen) predictor.
    train_data, val_data : Dataset or torch.Tensor or tuple
        Training and validation images (see
        :func:`brainage_core.explain.noise.objective.as_dataset`); with validation ages the
        curve also reports the MAEs (NaN without).
    lambdas : sequence of float, default=DEFAULT_LAMBDAS
        Candidate values, tried in increasing order.
    tolerance : float, default=1.0
        Allowed mean shift ``|f(x~) - f(x)|``, in years, on perturbed validation images.
    settings : NoiseSettings or None, default=None
        The objective of every candidate, with its ``lam`` replaced by the candidate's;
        None takes the defaults.
    explainer_kwargs : dict or None, default=None
        Further arguments of :class:`~brainage_core.explain.noise.amortised.NoiseMapExplainer`
        (``mask``, ``channels``, ``depth``, ...; noise settings such as ``s_max`` when
        ``settings`` is None), not ``lam``.
    fit_kwargs : dict or None, default=None
        Arguments of :meth:`~brainage_core.explain.noise.amortised.NoiseMapExplainer.fit`
        (``epochs``, ``batch_size``, ``lr``).
    n_draws : int, default=2
        Noise draws per validation image when measuring the noised MAE.
    warm_start : bool, default=False
        Start each candidate's noise model from the previous (smaller) lambda's weights.
        By default every candidate starts from the same initial weights, so candidates
        differ only by lambda.
    progress : bool, default=True
        Show a tqdm progress bar over the candidates.

    Returns
    -------
    CalibrationResult
        The chosen lambda, the trade-off curve and the trained explainer (its
        best-validation epoch). If no candidate meets the tolerance, the smallest lambda
        is returned with a warning.
    """
    check_positive("tolerance", tolerance, allow_zero=True)
    check_positive("n_draws", n_draws, integer=True)
    lams = sorted(float(check_positive("lambdas", lam)) for lam in lambdas)
    if not lams:
        raise BrainAgeInputError("'lambdas' must hold at least one value; [] was provided.")
    explainer_kwargs = dict(explainer_kwargs or {})
    if "lam" in explainer_kwargs:
        raise BrainAgeInputError("'explainer_kwargs' must not set 'lam'; pass 'lambdas'.")
    noise_kwargs = {
        k: explainer_kwargs.pop(k) for k in noise_field_names() if k in explainer_kwargs
    }
    base = resolve_settings(settings, noise_kwargs)
    fit_kwargs = {"progress": False, **(fit_kwargs or {})}
    val_set = as_dataset(val_data, "val_data")
    train_set = as_dataset(train_data, "train_data")
    rows: list[dict[str, float]] = []
    states: list[dict[str, torch.Tensor]] = []
    references: list[torch.Tensor | None] = []
    previous: dict[str, torch.Tensor] | None = None
    for lam in tqdm(lams, desc="calibrating lambda", disable=None if progress else True):
        explainer = NoiseMapExplainer(predictor, replace(base, lam=lam), **explainer_kwargs)
        if warm_start and previous is not None:
            explainer.noise_model.load_state_dict(previous)
        explainer.fit(train_set, val_set, **fit_kwargs)
        figures = explainer.evaluate(val_set, n_draws=n_draws)
        rows.append(
            {
                "lam": lam,
                "clean_mae": figures["clean_mae"],
                "noisy_mae": figures["noisy_mae"],
                "mae_rise": figures["noisy_mae"] - figures["clean_mae"],
                "shift": figures["shift"],
                "mean_b": figures["mean_b"],
                "mean_sigma": figures["mean_sigma"],
            }
        )
        previous = {k: v.detach().clone() for k, v in explainer.noise_model.state_dict().items()}
        states.append(previous)
        references.append(explainer.reference)
    curve = pd.DataFrame(rows)
    curve["within_tolerance"] = curve["shift"] <= tolerance
    if curve["within_tolerance"].any():
        best = int(curve.index[curve["within_tolerance"]][-1])
    else:
        best = 0
        warnings.warn(
            f"no lambda in {lams} keeps the validation shift within {tolerance} years "
            f"(smallest shift {curve['shift'].min():.2f}); using the smallest lambda.",
            stacklevel=2,
        )
    curve["chosen"] = curve.index == best
    chosen = NoiseMapExplainer(
        predictor, replace(base, lam=lams[best]), reference=references[best], **explainer_kwargs
    )
    chosen.noise_model.load_state_dict(states[best])
    chosen.noise_model.eval()
    return CalibrationResult(
        lam=lams[best], tolerance=float(tolerance), curve=curve, explainer=chosen
    )
