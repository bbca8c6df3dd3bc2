"""Networks by name: a checkpoint records the name, so a run reloads without knowing its class.

A new architecture is one module (a ``torch.nn.Module`` whose ``config`` attribute holds its
constructor arguments) and one line in :data:`ARCHITECTURES`; ``prediction.architecture``
in a study config then selects it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from brainage_core._utils.validation import check_choice
from brainage_core.models.cnn import BrainAgeCNN
from brainage_core.models.unet import UNet3D

#: The networks of the study by name.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "cnn": BrainAgeCNN,
    "unet": UNet3D,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the architecture ``name`` (a key of :data:`ARCHITECTURES`)."""
    check_choice("architecture", name, tuple(ARCHITECTURES))
    return ARCHITECTURES[name](**kwargs)


def architecture_name(model: nn.Module) -> str:
    """The registry name of ``model``'s class (what a checkpoint records)."""
    for name, cls in ARCHITECTURES.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is not in ARCHITECTURES; register it first.")
