"""The brain-age predictor: a small 3D CNN in the spirit of SFCN (Peng et al. 2021).

The network is a stack of blocks ``conv 3x3x3 -> norm -> ReLU -> max-pool 2``, a global
average pool and one of two heads. The input is first zero-padded symmetrically to a
multiple of ``2 ** depth`` (:func:`brainage_core._utils.padding.pad_to_multiple`): otherwise the
pooling of an odd-sized level drops its last column, on one side of the brain only, and
the trained network, with the importance maps of it, favours one hemisphere.

``"regression"``
    A linear layer predicts the standardised age; the model rescales it to years with
    the training ages' mean and standard deviation (stored as buffers, so a checkpoint
    carries them).
``"soft_label"``
    SFCN's variant: a linear layer predicts a distribution over age bins; training
    minimises the Kullback-Leibler divergence to a Gaussian "soft label" centred on the
    true age, and the prediction is the expected age under the predicted distribution.

Whatever the head, :meth:`BrainAgeCNN.forward` returns ages in years, shape ``(N,)``.
The forward pass is pure: no in-place operation touches the input, every ReLU is
``inplace=False`` and no hook is registered, so the frozen model can be differentiated
with respect to its input (importance maps, captum).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from brainage_core._utils.padding import pad_to_multiple
from brainage_core._utils.validation import (
    BrainAgeInputError,
    check_choice,
    check_fraction,
    check_positive,
)

#: Output heads of :class:`BrainAgeCNN`.
HEADS = ("regression", "soft_label")

#: How the last feature map becomes a feature vector: SFCN's global average pool, an average
#: over each octant of the grid (2 x 2 x 2 cells: the head knows left from right, front from
#: back and top from bottom, not more), or a flattening that keeps where in the brain a
#: feature was found (the inputs are registered).
POOLS = ("avg", "octants", "flatten")

#: Cells per axis of each pool's feature grid (``flatten``: the whole last feature map).
POOL_CELLS = {"avg": 1, "octants": 2}

#: Normalisation layers a block may use. ``"batch"`` is SFCN's choice; ``"group"`` and
#: ``"instance"`` act per subject, so they behave identically for any batch split.
NORMS = ("batch", "group", "instance", "none")


class BrainAgeCNN(nn.Module):
    """3D convolutional network that maps a T1-weighted volume to an age in years.

    Parameters
    ----------
    input_shape : sequence of 3 int
        Grid shape ``(X, Y, Z)`` of the inputs (the template grid of the cache).
    channels : sequence of int, default=(16, 32, 64, 64)
        Output channels of each block; its length is the depth. Every block halves the
        grid, so each dimension of ``input_shape`` must be at least ``2 ** depth``.
    head : {"regression", "soft_label"}, default="regression"
        Output head (see the module docstring).
    norm : {"batch", "group", "instance", "none"}, default="batch"
        Normalisation after each convolution.
    dropout : float, default=0.0
        Dropout probability before the head.
    pool : {"avg", "octants", "flatten"}, default="avg"
        Global average pooling of the last feature map (SFCN), averaging over each of its
        8 octants (the head sees coarsely where a feature lies), or flattening it (the
        head then sees where each feature lies; inputs are registered to the template).
    age_mean, age_std : float, default=60.0, 10.0
        Mean and standard deviation of the training ages (regression head): the head
        predicts ``(age - age_mean) / age_std``.
    age_range : tuple of 2 float, default=(40.0, 90.0)
        Range covered by the age bins (soft-label head).
    bin_width : float, default=1.0
        Width of an age bin in years (soft-label head).
    soft_label_sigma : float, default=1.0
        Standard deviation in years of the Gaussian soft labels (soft-label head).

    Notes
    -----
    ``model.config`` holds the constructor arguments, so ``BrainAgeCNN(**model.config)``
    rebuilds the architecture (this is what checkpoints store).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        channels: Sequence[int] = (16, 32, 64, 64),
        head: str = "regression",
        norm: str = "batch",
        dropout: float = 0.0,
        pool: str = "avg",
        age_mean: float = 60.0,
        age_std: float = 10.0,
        age_range: Sequence[float] = (40.0, 90.0),
        bin_width: float = 1.0,
        soft_label_sigma: float = 1.0,
    ) -> None:
        super().__init__()
        input_shape = _check_shape(input_shape, len(channels) if _is_seq(channels) else 0)
        channels = _check_channels(channels)
        check_choice("head", head, HEADS)
        check_choice("norm", norm, NORMS)
        check_fraction("dropout", dropout)
        check_choice("pool", pool, POOLS)
        check_positive("age_std", age_std)
        check_positive("bin_width", bin_width)
        check_positive("soft_label_sigma", soft_label_sigma)
        lo, hi = _check_range(age_range)
        self.config: dict[str, Any] = {
            "input_shape": list(input_shape),
            "channels": list(channels),
            "head": head,
            "norm": norm,
            "dropout": float(dropout),
            "pool": pool,
            "age_mean": float(age_mean),
            "age_std": float(age_std),
            "age_range": [lo, hi],
            "bin_width": float(bin_width),
            "soft_label_sigma": float(soft_label_sigma),
        }
        self.head = head
        self.pool = pool
        blocks = []
        in_ch = 1
        for out_ch in channels:
            blocks.append(_Block(in_ch, out_ch, norm))
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        if pool == "flatten":
            final = [-(-s // 2 ** len(channels)) for s in input_shape]  # padded, then pooled
            in_ch *= final[0] * final[1] * final[2]
        else:
            in_ch *= POOL_CELLS[pool] ** 3
        if head == "regression":
            self.output = nn.Linear(in_ch, 1)
            bin_centers = torch.zeros(0)
        else:
            n_bins = max(int(round((hi - lo) / bin_width)), 2)
            bin_centers = lo + bin_width * (torch.arange(n_bins, dtype=torch.float32) + 0.5)
            self.output = nn.Linear(in_ch, n_bins)
        self.register_buffer("age_mean", torch.tensor(float(age_mean)))
        self.register_buffer("age_std", torch.tensor(float(age_std)))
        self.register_buffer("bin_centers", bin_centers)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Grid shape ``(X, Y, Z)`` the model was built for."""
        return tuple(self.config["input_shape"])  # type: ignore[return-value]

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """Head output before conversion to years.

        Parameters
        ----------
        x : torch.Tensor of shape (N, 1, X, Y, Z)
            Input volumes.

        Returns
        -------
        torch.Tensor
            Standardised ages, shape ``(N,)`` (regression head), or log-probabilities
            over the age bins, shape ``(N, n_bins)`` (soft-label head).
        """
        if x.ndim != 5 or x.shape[1] != 1:
            raise BrainAgeInputError(
                f"'x' must have shape (N, 1, X, Y, Z); {tuple(x.shape)} was provided."
            )
        if tuple(x.shape[2:]) != self.input_shape and self.pool == "flatten":
            raise BrainAgeInputError(
                f"'x' must have the grid {self.input_shape} the model was built for; "
                f"{tuple(x.shape[2:])} was provided."
            )
        h, _ = pad_to_multiple(x, 2 ** len(self.features))
        h = self.features(h)
        if self.pool != "flatten":
            h = F.adaptive_avg_pool3d(h, POOL_CELLS[self.pool])
        h = torch.flatten(h, 1)
        out = self.output(self.dropout(h))
        if self.head == "regression":
            return out[:, 0]
        return F.log_softmax(out.float(), dim=1)

    def to_years(self, raw: torch.Tensor) -> torch.Tensor:
        """Convert :meth:`raw` output to ages in years, shape ``(N,)``."""
        if self.head == "regression":
            return raw.float() * self.age_std + self.age_mean
        # Outside autocast: a bfloat16 matmul would round ages of 64-128 y to 0.5 y.
        with torch.autocast(raw.device.type, enabled=False):
            return raw.float().exp() @ self.bin_centers.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict ages in years.

        Parameters
        ----------
        x : torch.Tensor of shape (N, 1, X, Y, Z)
            Input volumes.

        Returns
        -------
        torch.Tensor of shape (N,)
            Predicted ages in years.
        """
        return self.to_years(self.raw(x))

    def loss(self, raw: torch.Tensor, age: torch.Tensor, kind: str = "mae") -> torch.Tensor:
        """Training loss of a batch, from :meth:`raw` output and true ages in years.

        Parameters
        ----------
        raw : torch.Tensor
            Output of :meth:`raw`.
        age : torch.Tensor of shape (N,)
            True ages in years.
        kind : {"mae", "mse"}, default="mae"
            Loss of the regression head, on standardised ages. The soft-label head always
            uses the Kullback-Leibler divergence to the soft labels.

        Returns
        -------
        torch.Tensor
            Scalar mean loss over the batch.
        """
        check_choice("loss", kind, ("mae", "mse"))
        age = age.float()
        if self.head == "soft_label":
            target = soft_labels(age, self.bin_centers, self.config["soft_label_sigma"])
            return F.kl_div(raw, target, reduction="batchmean")
        z = (age - self.age_mean) / self.age_std
        if kind == "mae":
            return F.l1_loss(raw.float(), z)
        return F.mse_loss(raw.float(), z)


def soft_labels(age: torch.Tensor, bin_centers: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian soft labels: one probability distribution over the bins per age.

    Parameters
    ----------
    age : torch.Tensor of shape (N,)
        Ages in years.
    bin_centers : torch.Tensor of shape (B,)
        Centres of the age bins in years.
    sigma : float
        Standard deviation of the Gaussian in years.

    Returns
    -------
    torch.Tensor of shape (N, B)
        Rows sum to one.
    """
    logits = -0.5 * ((age[:, None] - bin_centers[None, :]) / sigma) ** 2
    return torch.softmax(logits, dim=1)


class _Block(nn.Sequential):
    """conv 3x3x3 -> norm -> ReLU (not in place) -> max-pool 2."""

    def __init__(self, in_ch: int, out_ch: int, norm: str) -> None:
        super().__init__(
            nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1, bias=norm == "none"),
            _norm_layer(norm, out_ch),
            nn.ReLU(inplace=False),
            nn.MaxPool3d(2),
        )


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    if norm == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.Identity()


def _is_seq(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def _check_channels(channels: Any) -> list[int]:
    ok = _is_seq(channels) and len(channels) > 0
    ok = ok and all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels)
    if not ok:
        raise BrainAgeInputError(
            f"'channels' must be a non-empty list of positive integers; {channels!r} was provided."
        )
    return [int(c) for c in channels]


def _check_shape(shape: Any, depth: int) -> tuple[int, int, int]:
    ok = _is_seq(shape) and len(shape) == 3
    ok = ok and all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
    if not ok:
        raise BrainAgeInputError(
            f"'input_shape' must be 3 integers (X, Y, Z); {shape!r} was provided."
        )
    if min(shape) < 2**depth:
        raise BrainAgeInputError(
            f"'input_shape' {tuple(shape)} is too small for {depth} blocks: each dimension "
            f"must be at least 2**{depth} = {2**depth}; use fewer 'channels' entries."
        )
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def _check_range(age_range: Any) -> tuple[float, float]:
    ok = _is_seq(age_range) and len(age_range) == 2
    ok = ok and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in age_range)
    if not ok or age_range[0] >= age_range[1]:
        raise BrainAgeInputError(
            f"'age_range' must be two numbers (low, high) with low < high; "
            f"{age_range!r} was provided."
        )
    return float(age_range[0]), float(age_range[1])
