"""Task metrics (thin wrappers over scikit-learn and friends) and evaluation helpers."""
