"""A small 3D U-Net: the noise model g of the importance maps.

The network maps an image ``(N, C, X, Y, Z)`` to logits of the same spatial shape. Any
grid size is accepted: the input is padded up to a multiple of ``2 ** depth`` and the
output cropped back, so the odd-sized template grids (for example 20 x 24 x 21 voxels at
8 mm) need no special care. ReLUs are not in-place, so attribution hooks stay valid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from brainage_core._utils.padding import pad_to_multiple
from brainage_core._utils.validation import check_positive


class _DoubleConv(nn.Sequential):
    """Two 3x3x3 convolutions, each followed by instance normalisation and a ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.InstanceNorm3d(out_channels, affine=True),
            nn.ReLU(inplace=False),
            nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.InstanceNorm3d(out_channels, affine=True),
            nn.ReLU(inplace=False),
        )


class UNet3D(nn.Module):
    """A compact 3D U-Net producing one logit per voxel.

    Parameters
    ----------
    in_channels : int, default=1
        Channels of the input image.
    out_channels : int, default=1
        Channels of the output logits.
    channels : int, default=8
        Feature maps at the finest level; doubled at each coarser level.
    depth : int, default=2
        Number of down-sampling steps (max pooling by 2).
    init_bias : float, default=0.0
        Initial bias of the output convolution. ``sigmoid(init_bias)`` is the value the
        noise model starts from (0.5 for the default).

    Examples
    --------
    >>> net = UNet3D(channels=4, depth=2)
    >>> net(torch.zeros(2, 1, 20, 24, 21)).shape
    torch.Size([2, 1, 20, 24, 21])
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        *,
        channels: int = 8,
        depth: int = 2,
        init_bias: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive("in_channels", in_channels, integer=True)
        check_positive("out_channels", out_channels, integer=True)
        check_positive("channels", channels, integer=True)
        check_positive("depth", depth, integer=True, allow_zero=True)
        self.depth = depth
        widths = [channels * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.down.append(_DoubleConv(previous, width))
            previous = width
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose3d(previous, width, kernel_size=2, stride=2))
            self.merge.append(_DoubleConv(2 * width, width))
            previous = width
        self.head = nn.Conv3d(previous, out_channels, kernel_size=1)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, float(init_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits shaped ``(N, out_channels, X, Y, Z)`` for ``x`` of ``(N, C, X, Y, Z)``."""
        if x.ndim != 5:
            raise ValueError(f"'x' must have shape (N, C, X, Y, Z); {tuple(x.shape)} was provided.")
        shape = x.shape[2:]
        # symmetric padding: a left-right symmetric image gets a (nearly) symmetric map
        h, before = pad_to_multiple(x, 2**self.depth)
        skips = []
        for level, block in enumerate(self.down):
            if level > 0:
                h = F.max_pool3d(h, kernel_size=2)
            h = block(h)
            skips.append(h)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1]), strict=True):
            h = merge(torch.cat([up(h), skip], dim=1))
        out = self.head(h)
        return out[
            :,
            :,
            before[0] : before[0] + shape[0],
            before[1] : before[1] + shape[1],
            before[2] : before[2] + shape[2],
        ]
