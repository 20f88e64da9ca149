"""Models: the offline registry (short names -> local folders), tiny test models, and model anatomy."""

from tuneforge.models.registry import ModelEntry, list_models, model_family, register, resolve_model

__all__ = ["ModelEntry", "list_models", "model_family", "register", "resolve_model"]
