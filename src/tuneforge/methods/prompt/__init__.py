"""Prompt tuning (Lester et al. 2021): a trained soft prompt prepended to the input embeddings."""
