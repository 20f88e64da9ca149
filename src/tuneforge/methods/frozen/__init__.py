"""Frozen backbone (feature extraction): train the head on backbone features computed once."""
