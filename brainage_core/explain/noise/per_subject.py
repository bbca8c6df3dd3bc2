"""Per-subject noise maps: the logits of B optimised for one image at a time."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from brainage_core._utils.docs import fill_doc
from brainage_core._utils.torch import frozen
from brainage_core._utils.validation import (
    BrainAgeInputError,
    check_fraction,
    check_positive,
)
from brainage_core.explain.noise.objective import NoiseObjective, check_inputs, epoch_generator
from brainage_core.explain.noise.settings import NoiseSettings


# -- the per-subject explainer ----------------------------------------------------------------
@fill_doc
class PerSubjectNoiseMap(NoiseObjective):
    """Noise maps optimised directly for each image (meaningful-perturbation style).

    The logits of ``B`` are free parameters per image, optimised with Adam on the same
    objective as :class:`NoiseMapExplainer`. No training set is needed, but every map
    costs up to ``steps`` forward and backward passes of the predictor.

    Free per-voxel logits with one noise draw per step converge slowly and give noisy
    maps; three options make the optimisation converge (Fong et al., 2019, extremal
    perturbations):

    * ``coarse``: the logits live on a grid ``coarse`` times coarser and are upsampled
      (trilinear), so neighbouring voxels share their noise level;
    * ``fixed_noise``: the same noise draw at every step (the objective is then
      deterministic; the replacement perturbations without ``noise_sd`` are anyway);
    * ``mean_b``: the operating point. The regulariser ``-lambda mean log B`` is replaced
      by ``area_weight * (mean_brain(B) - mean_b)**2``, so the map spends the same noise
      budget as the amortised model it is compared with.

    Optimisation stops after ``steps`` steps, or earlier when the objective has not
    improved by more than ``tol`` (years) over the last ``patience`` steps;
    :attr:`history_` holds the objective, the task loss and mean B of every step.

    Parameters
    ----------
    %(predictor)s
    settings : NoiseSettings or None, default=None
        The objective, the same object as the amortised model's (None: from ``**noise``).
    %(mask)s
    reference : array-like or None, default=None
        The training-mean image (required by "replace_mean"; see
        :class:`~brainage_core.explain.noise.objective.NoiseObjective`).
    steps : int, default=100
        Most optimisation steps per image.
    lr : float, default=0.1
        Adam learning rate on the logits.
    init_logit : float, default=0.0
        Starting logit of B everywhere (with ``mean_b``, the logit of ``mean_b``).
    coarse : int, default=1
        Logits on a grid coarser by this factor (1: one logit per voxel).
    fixed_noise : bool, default=False
        Reuse one noise draw at every step.
    mean_b : float or None, default=None
        Target mean of B in the brain (the operating point); None keeps the paper's
        regulariser.
    area_weight : float, default=100.0
        Weight of the operating-point penalty.
    tol : float, default=0.01
        Improvement of the objective (years, the unit of the task loss) below which it
        counts as converged.
    patience : int or None, default=20
        Steps without such an improvement before stopping (None: always run ``steps``).
    **noise
        Fields of :class:`~brainage_core.explain.noise.settings.NoiseSettings`, when
        ``settings`` is None.
    """

    def __init__(
        self,
        predictor: nn.Module,
        settings: NoiseSettings | None = None,
        *,
        mask: Any = None,
        reference: Any = None,
        steps: int = 100,
        lr: float = 0.1,
        init_logit: float = 0.0,
        coarse: int = 1,
        fixed_noise: bool = False,
        mean_b: float | None = None,
        area_weight: float = 100.0,
        tol: float = 0.01,
        patience: int | None = 20,
        **noise: Any,
    ) -> None:
        super().__init__(predictor, settings, mask=mask, reference=reference, **noise)
        self.steps = int(check_positive("steps", steps, integer=True))
        self.lr = float(check_positive("lr", lr))
        self.init_logit = float(init_logit)
        self.coarse = int(check_positive("coarse", coarse, integer=True))
        self.fixed_noise = bool(fixed_noise)
        self.mean_b = None if mean_b is None else float(check_fraction("mean_b", mean_b))
        self.area_weight = float(check_positive("area_weight", area_weight))
        self.tol = float(check_positive("tol", tol, allow_zero=True))
        self.patience = (
            None if patience is None else int(check_positive("patience", patience, integer=True))
        )
        self._history: list[dict[str, float]] = []

    @property
    def history_(self) -> pd.DataFrame:
        """One row per step of the last :meth:`attribute` call: ``step``, ``objective``,
        ``task`` and ``mean_b`` (means over the images)."""
        return pd.DataFrame(self._history, columns=["step", "objective", "task", "mean_b"])

    @property
    def steps_run_(self) -> int:
        """Steps the last :meth:`attribute` call ran (fewer than ``steps`` if it stopped)."""
        return len(self._history)

    def _full_logits(self, params: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if self.coarse == 1:
            return params
        return F.interpolate(params, size=shape, mode="trilinear", align_corners=False)

    def attribute(
        self,
        inputs: torch.Tensor,
        ages: torch.Tensor | None = None,
        *,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Optimise one map per image and return the importance ``1 - B``.

        Parameters
        ----------
        inputs : torch.Tensor of shape (N, 1, X, Y, Z) or (1, X, Y, Z)
            Images to explain. They are optimised jointly (the loss is a sum over images
            and Adam acts per element); the stopping rule watches their summed objective.
        ages : torch.Tensor of shape (N,) or None, default=None
            True ages; required when ``target="age"``.
        batch_size : int or None, default=None
            Images optimised together (bounds the memory); None optimises all at once.
        progress : bool, default=False
            Show a tqdm progress bar over the optimisation steps.

        Returns
        -------
        torch.Tensor
            Importance in [0, 1] shaped like ``inputs``, zero outside the brain mask.
        """
        x = check_inputs(inputs).to(self.device)
        n = x.shape[0]
        if batch_size is not None and n > check_positive("batch_size", batch_size, integer=True):
            ages_list = [None] * n if ages is None else torch.as_tensor(ages).reshape(-1)
            parts = [
                self.attribute(
                    x[i : i + batch_size],
                    None if ages is None else ages_list[i : i + batch_size],
                    progress=progress,
                )
                for i in range(0, n, batch_size)
            ]
            return torch.cat(parts).to(torch.as_tensor(inputs).device).reshape(inputs.shape)
        ages_t = (
            torch.full((n,), float("nan"))
            if ages is None
            else torch.as_tensor(ages, dtype=torch.float32).reshape(-1)
        )
        if ages_t.shape[0] != n:
            raise BrainAgeInputError(f"'ages' must hold {n} values; {ages_t.shape[0]} given.")
        grid = tuple(x.shape[2:])
        mask = self._brain_mask(grid)
        coarse_shape = tuple(-(-g // self.coarse) for g in grid)
        start = self.init_logit
        if self.mean_b is not None:  # start at the operating point
            start = float(np.log(self.mean_b / (1.0 - self.mean_b)))
        params = torch.full((n, 1, *coarse_shape), start, device=self.device, requires_grad=True)
        optimiser = torch.optim.Adam([params], lr=self.lr)
        gen = epoch_generator(self.noise.seed, 0, 3, self.device)
        self._history = []
        best, since_best = float("inf"), 0
        with frozen(self.predictor):
            targets = self._targets(x, ages_t)
            bar = tqdm(
                range(self.steps), desc="per-subject map", disable=None if progress else True
            )
            for step in bar:
                if self.fixed_noise:
                    gen = epoch_generator(self.noise.seed, 0, 3, self.device)
                logits = self._full_logits(params, grid)
                task, reg, b = self._loss(x, logits, targets, gen)
                mean_b = (b * mask).flatten(1).sum(1) / mask.sum()
                if self.mean_b is None:
                    penalty = self.noise.lam * reg
                else:
                    penalty = self.area_weight * (mean_b - self.mean_b).square()
                loss = (task + penalty).sum()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                objective = float(loss.detach()) / n
                self._history.append(
                    {
                        "step": step + 1,
                        "objective": objective,
                        "task": float(task.detach().mean()),
                        "mean_b": float(mean_b.detach().mean()),
                    }
                )
                if objective < best - self.tol:
                    best, since_best = objective, 0
                else:
                    since_best += 1
                if self.patience is not None and since_best >= self.patience:
                    break
            bar.close()
        with torch.no_grad():
            importance = self._importance(torch.sigmoid(self._full_logits(params, grid)))
        return importance.to(torch.as_tensor(inputs).device).reshape(inputs.shape)
