"""Small torch helpers shared by the explainers, calibration and scoring."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from brainage_core._utils.validation import (
    BrainAgeInputError,
)


# -- helpers shared by the explainers, calibration and scoring ------------------------------
@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with ``requires_grad=False``; restore both afterwards.

    Gradients still flow through the model to its *input*, but none reach its weights.
    """
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)


def predict_batch(predictor: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Call ``predictor`` on ``x`` and return predictions shaped ``(N,)``."""
    out = predictor(x)
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.ndim != 1 or out.shape[0] != x.shape[0]:
        raise BrainAgeInputError(
            f"the predictor must return one value per image, shaped (N,); it returned "
            f"{tuple(out.shape)} for an input of {tuple(x.shape)}."
        )
    return out


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def as_mask(mask: Any, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Turn a brain mask (array, tensor or None = everywhere) into a float tensor.

    Returns a tensor shaped ``(1, 1, X, Y, Z)`` holding 0 and 1.
    """
    if mask is None:
        return torch.ones((1, 1, *shape), device=device)
    m = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask)
    m = m.reshape(m.shape[-3:]) if m.ndim > 3 else m
    if tuple(m.shape) != tuple(shape):
        raise BrainAgeInputError(
            f"'mask' must have the images' grid shape {tuple(shape)}; "
            f"{tuple(m.shape)} was provided."
        )
    return (m != 0).to(device=device, dtype=torch.float32)[None, None]


def subject_seed(*key: int) -> int:
    """A 32-bit seed derived from integers (for example ``seed, subject position``).

    Draws made from it depend only on ``key``, never on what was drawn before, so a
    subject's random draws are the same whichever process handles it and in what order.
    """
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


@contextlib.contextmanager
def seeded(*key: int) -> Iterator[int]:
    """Seed torch's global generators from ``key`` inside the block; restore them after.

    Methods that draw from torch's global generator (SmoothGrad, GradientShap, a
    :class:`~brainage_core.explain.reference.RandomMap` without a seed) then give each
    subject the same map in one process or in any shard of a ``torchrun`` job.
    """
    seed = subject_seed(*key)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield seed
