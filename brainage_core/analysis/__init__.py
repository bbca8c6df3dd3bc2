"""Analysis of importance maps: scores against the truth and the model, regions,
population maps and the predictor's reliance on each planted effect."""
