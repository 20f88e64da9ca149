"""CLI verbs beyond the core ones, one module per area; each exposes ``register(app)`` (see cli.py)."""
