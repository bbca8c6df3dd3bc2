"""Tests of the small 3D U-Net noise model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brainage_core._utils.validation import BrainAgeInputError
from brainage_core.models.unet import UNet3D


@pytest.mark.parametrize("shape", [(16, 16, 16), (20, 24, 21), (9, 10, 11)])
def test_output_has_input_grid(shape):
    net = UNet3D(channels=2, depth=2)
    out = net(torch.randn(2, 1, *shape))
    assert out.shape == (2, 1, *shape)


def test_initial_output_is_init_bias_and_gradients_flow():
    net = UNet3D(channels=2, depth=1, init_bias=1.5)
    x = torch.randn(1, 1, 8, 8, 8)
    out = net(x)
    assert torch.allclose(out, torch.full_like(out, 1.5))
    out.sum().backward()
    assert net.head.weight.grad is not None and net.head.weight.grad.abs().sum() > 0


def test_relus_are_not_inplace():
    relus = [m for m in UNet3D(channels=2).modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(m.inplace for m in relus)


def test_bad_arguments_are_named():
    with pytest.raises(BrainAgeInputError, match="'channels'"):
        UNet3D(channels=0)
    with pytest.raises(ValueError, match="'x'"):
        UNet3D(channels=2)(torch.zeros(1, 8, 8, 8))
