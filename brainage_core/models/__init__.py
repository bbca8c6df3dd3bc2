"""Predictors of brain age: architectures, the training loop, evaluation and baselines."""

from brainage_core.models.registry import ARCHITECTURES, architecture_name, build_model

__all__ = ["ARCHITECTURES", "architecture_name", "build_model"]
