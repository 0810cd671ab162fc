"""Model registry: architectures by name, each with its input size and default preprocessing."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from quantship.config import PreprocessSpec
from quantship.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture.

    Attributes:
        name: Registry name (``mobilenet_0.5_160``).
        build: ``build(num_classes=..., input_shape=...) -> keras.Model`` with random weights.
        input_size: (height, width) of the default input.
        preprocess: Default evaluation preprocessing.
        family: Architecture family (``mobilenet``, ``efficientnet_lite``, ...).
        pretrained: Callable returning a weights file for built-in ImageNet weights, when available offline.
        weights_preprocess: The preprocessing the built-in weights were trained with, when it differs from
            ``preprocess`` (used with ``--weights pretrained``).
        description: One line for ``quantship models``.
    """

    name: str
    build: Callable[..., Any]
    input_size: tuple[int, int]
    preprocess: PreprocessSpec
    family: str
    pretrained: Callable[[], Path] | None = None
    weights_preprocess: PreprocessSpec | None = None
    description: str = ""
    task: str = "classification"
    num_classes: int = 1000
    extra: dict[str, Any] = field(default_factory=dict)


_MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry (names are unique)."""
    if spec.name in _MODELS:
        raise ValueError(f"model '{spec.name}' registered twice")
    _MODELS[spec.name] = spec
    return spec


def _ensure_loaded() -> None:
    # Registration happens on import of the zoo modules (by name, as the runtime registry loads its built-ins, so the
    # registry does not import its own package back); importing them builds nothing.
    importlib.import_module("quantship.models.zoo")


def get_model_spec(name: str) -> ModelSpec:
    """Look up a registered model by name (case-insensitive; ``-`` and ``_`` interchangeable)."""
    _ensure_loaded()
    key = name.strip().lower().replace("-", "_")
    for spec in _MODELS.values():
        if spec.name.lower().replace("-", "_") == key:
            return spec
    close = [n for n in _MODELS if key.split("_")[0] in n.lower()]
    hint = f" Did you mean: {', '.join(close[:6])}?" if close else ""
    raise ConfigError(f"unknown model '{name}'.{hint} Run 'quantship models' for the list.")


def list_models(task: str | None = None) -> list[ModelSpec]:
    """All registered models, in registration order."""
    _ensure_loaded()
    return [m for m in _MODELS.values() if task is None or m.task == task]
