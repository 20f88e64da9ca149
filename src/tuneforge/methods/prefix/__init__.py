"""Prefix tuning (Li & Liang 2021): trained key/value prefixes at every layer, optionally reparameterised by an MLP."""
