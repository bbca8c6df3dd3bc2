"""Explainers: voxel-level importance maps of a trained predictor."""
