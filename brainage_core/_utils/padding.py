"""Symmetric zero-padding of volumes to a multiple of the pooling factor."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, factor: int) -> tuple[torch.Tensor, list[int]]:
    """Zero-pad the spatial axes of ``x`` ``(N, C, X, Y, Z)`` up to multiples of ``factor``.

    The padding is split between both sides of each axis (an odd remainder goes to the
    far side). Max-pooling ``log2(factor)`` times then drops no voxel, and a left-right
    symmetric image stays symmetric on every level, so a network treats both hemispheres
    alike. (Without it, pooling an odd-sized level silently drops its last column, which
    lies in one hemisphere.)

    Returns
    -------
    padded : torch.Tensor
        The padded volumes.
    before : list of int
        Voxels added before each spatial axis (to crop an output back).
    """
    extra = [(-size) % factor for size in x.shape[2:]]
    before = [e // 2 for e in extra]
    pad: list[int] = []
    for e, b in zip(reversed(extra), reversed(before), strict=True):
        pad.extend([b, e - b])  # F.pad takes the last axis first
    return F.pad(x, pad), before
