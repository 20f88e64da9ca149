"""BitFit: train only the bias terms (and the task head) (Ben Zaken et al. 2022)."""
