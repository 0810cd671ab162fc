"""One helper for importing optional or heavy dependencies on first use, and the lazy public names of each layer."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any, Callable

from quantship.errors import MissingDependencyError

_QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}


def lazy_import(name: str, pip_name: str | None = None, purpose: str = "") -> ModuleType:
    """Import ``name`` now, or raise a :class:`MissingDependencyError` that says what to install.

    Args:
        name: Module to import, e.g. ``"tensorrt"``.
        pip_name: Distribution that provides it, when it differs from ``name``.
        purpose: What the module is needed for, for the message.

    Returns:
        The imported module.

    Raises:
        MissingDependencyError: The module is not installed or fails to import.
    """
    if name.split(".")[0] in ("tensorflow", "keras", "tf2onnx"):
        for key, value in _QUIET_TF.items():
            os.environ.setdefault(key, value)
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        what = f" (needed for {purpose})" if purpose else ""
        raise MissingDependencyError(
            f"Python module '{name}' is not available{what}: {exc}. Install it with: pip install {pip_name or name}"
        ) from exc


def is_available(name: str) -> bool:
    """True when ``name`` can be imported (the import itself is attempted)."""
    try:
        importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 - broken installs (e.g. TensorRT without libs) count as absent
        return False


def public_attributes(package: str, public: dict[str, str]) -> Callable[[str], Any]:
    """A package's module-level ``__getattr__`` (PEP 562) that imports each public name from the module ``public``
    maps it to on first use, so importing the package never loads its siblings."""

    def __getattr__(name: str) -> Any:
        if name in public:
            return getattr(importlib.import_module(public[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
