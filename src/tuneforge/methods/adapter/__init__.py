"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), our own implementation over forward hooks."""
