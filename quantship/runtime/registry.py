"""The runtimes by name: which artifact files each one runs, how its runner is made and how it is timed, whether
it is installed here, the fields its result rows carry and the Python distributions its numbers depend on.

Each runtime module registers itself (:func:`register_runtime`); adding a runtime is one module and one
registration. Targets (``quantship.targets``), ``bench`` and sensitivity find runners only through here, and
:func:`tool_distributions` is the one list of tool versions that manifests, environments and sign-off unit keys
record.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from quantship.errors import ConfigError
from quantship.manifest import installed_versions
from quantship.runtime.base import Runner, RunnerOptions

BUILTIN_RUNTIMES = ("keras", "tflite", "onnxruntime", "tensorrt")  # modules of quantship.runtime
# What every runtime's numbers depend on besides its own libraries: this package, numpy, and the image decoders
# that make every input (OpenCV decodes, Pillow reads what OpenCV cannot); a decoder upgrade changes pixels.
SHARED_DISTRIBUTIONS = ("quantship", "numpy", "opencv-python", "opencv-python-headless", "pillow")


@dataclass(frozen=True)
class RuntimeInfo:
    """A registered runtime.

    Attributes:
        name: Backend name used in target specs and result rows (``tflite``).
        make_runner: ``make_runner(source, options, name) -> Runner``; ``source`` is an artifact path (or, for
            in-memory runtimes such as Keras, the model object).
        suffixes: Artifact file suffixes this runtime runs (``.tflite``); empty for in-memory runtimes.
        timing: ``host`` (wall time of the runtime call) or ``cuda-events`` (H2D / compute / D2H from CUDA
            events beside the wall time).
        description: One line for listings.
        available: ``available() -> bool``: whether this machine can run it (its libraries import).
        row_fields: ``row_fields(options) -> dict``: what a result row records about how it ran, beyond the
            threads every row has (ONNX Runtime: its execution providers).
        gpu: Runs on an NVIDIA GPU (a Ray sign-off gives its tasks a GPU).
        distributions: The pip distributions (converter and runtime) whose versions change this runtime's
            numbers; part of every manifest and sign-off unit key.
    """

    name: str
    make_runner: Callable[[Any, RunnerOptions, str | None], Runner]
    suffixes: tuple[str, ...] = ()
    timing: str = "host"
    description: str = ""
    available: Callable[[], bool] = lambda: True
    row_fields: Callable[[RunnerOptions], dict[str, Any]] = lambda options: {}
    gpu: bool = False
    distributions: tuple[str, ...] = ()


_RUNTIMES: dict[str, RuntimeInfo] = {}
_loaded = False


def register_runtime(info: RuntimeInfo) -> RuntimeInfo:
    """Add a runtime (names are unique)."""
    if info.name in _RUNTIMES and _RUNTIMES[info.name] is not info:
        raise ValueError(f"runtime '{info.name}' registered twice")
    _RUNTIMES[info.name] = info
    return info


def unregister_runtime(name: str) -> None:
    """Remove a runtime (a plug-in's or a test's); its targets must be removed first."""
    _RUNTIMES.pop(name, None)


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_RUNTIMES:  # importing a runtime module imports no runtime library
            importlib.import_module(f"quantship.runtime.{module}")


def get_runtime(name: str) -> RuntimeInfo:
    _ensure_loaded()
    if name not in _RUNTIMES:
        raise ConfigError(f"unknown runtime '{name}'; known: {', '.join(_RUNTIMES)}")
    return _RUNTIMES[name]


def list_runtimes() -> list[RuntimeInfo]:
    _ensure_loaded()
    return list(_RUNTIMES.values())


def runtime_for_artifact(path: str | Path) -> RuntimeInfo:
    """The runtime that runs an artifact file, by its suffix."""
    _ensure_loaded()
    suffix = Path(path).suffix.lower()
    for info in _RUNTIMES.values():
        if suffix in info.suffixes:
            return info
    known = sorted(s for info in _RUNTIMES.values() for s in info.suffixes)
    raise ConfigError(f"no runtime runs '{Path(path).name}': expected one of {', '.join(known)}")


def make_runner(
    source: Any, options: RunnerOptions = RunnerOptions(), name: str | None = None, runtime: str | None = None
) -> Runner:
    """The runner for ``source``: an artifact file (runtime chosen by its suffix unless ``runtime`` is given)
    or an in-memory model of an in-memory runtime."""
    info = get_runtime(runtime) if runtime else runtime_for_artifact(source)
    return info.make_runner(source, options, name)


def tool_distributions() -> tuple[str, ...]:
    """The one list of distributions whose versions are recorded (manifests, environment, sign-off unit keys):
    the shared ones, then each registered runtime's, without repeats."""
    _ensure_loaded()
    names = [*SHARED_DISTRIBUTIONS, *(d for info in _RUNTIMES.values() for d in info.distributions)]
    return tuple(dict.fromkeys(names))


def tool_versions(names: tuple[str, ...] | None = None) -> dict[str, str]:
    """Installed versions of :func:`tool_distributions` (or of ``names``); absent ones left out."""

    return installed_versions(names if names is not None else tool_distributions())
