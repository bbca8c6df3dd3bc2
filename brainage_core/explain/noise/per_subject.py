"""Per-subject noise maps: the logits of B optimised for one image at a time."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from brainage_core._utils.docs import fill_doc
from brainage_core._utils.torch import frozen
from brainage_core._utils.validation import (
    BrainAgeInputError,
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
    costs ``steps`` forward and backward passes of the predictor.

    Parameters
    ----------
    %(predictor)s
    settings : NoiseSettings or None, default=None
        The objective, the same object as the amortised model's (None: from ``**noise``).
    %(mask)s
    steps : int, default=100
        Optimisation steps per image.
    lr : float, default=0.1
        Adam learning rate on the logits.
    init_logit : float, default=0.0
        Starting logit of B everywhere.
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
        steps: int = 100,
        lr: float = 0.1,
        init_logit: float = 0.0,
        **noise: Any,
    ) -> None:
        super().__init__(predictor, settings, mask=mask, **noise)
        self.steps = int(check_positive("steps", steps, integer=True))
        self.lr = float(check_positive("lr", lr))
        self.init_logit = float(init_logit)

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
            Images to explain. They are optimised jointly; since Adam acts per element and
            the loss is a sum over images, each map is the same as if optimised alone.
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
        gen = epoch_generator(self.noise.seed, 0, 3, self.device)
        logits = torch.full_like(x, self.init_logit, requires_grad=True)
        optimiser = torch.optim.Adam([logits], lr=self.lr)
        with frozen(self.predictor):
            targets = self._targets(x, ages_t)
            bar = tqdm(
                range(self.steps), desc="per-subject map", disable=None if progress else True
            )
            for _ in bar:
                task, reg, _b = self._loss(x, logits, targets, gen)
                loss = (task + self.noise.lam * reg).sum()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
        with torch.no_grad():
            importance = self._importance(torch.sigmoid(logits))
        return importance.to(torch.as_tensor(inputs).device).reshape(inputs.shape)
