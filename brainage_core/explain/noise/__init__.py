"""The noise model of the paper (U-Noise adapted to regression) and its variants."""
