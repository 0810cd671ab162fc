"""Architectures by name (registry), built-in weights, and loading user models/weights."""

from quantship.models.registry import ModelSpec, get_model_spec, list_models, register_model

__all__ = ["ModelSpec", "get_model_spec", "list_models", "register_model"]
