"""Predictors of brain age: architectures, the training loop, evaluation and baselines."""
