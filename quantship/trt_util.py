"""TensorRT helpers shared by the engine builder (``convert/tensorrt.py``) and the runner
(``runtime/tensorrt.py``), so that neither imports the other (as Polygraphy's ``backend/trt/util.py``).

Nothing here imports TensorRT at module level; :func:`import_tensorrt` says how to get it when it is missing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from quantship.cuda import device_info
from quantship.errors import ConfigError, MissingDependencyError, RuntimeBackendError

if TYPE_CHECKING:  # the TensorRT stubs type these (scripts/typecheck.sh); never imported at run time
    import tensorrt

log = logging.getLogger("quantship.tensorrt")


def import_tensorrt():  # noqa: ANN201 - the return type is the tensorrt module itself (see the docstring)
    """``import tensorrt`` with a message that says how to get it.

    Returns:
        The ``tensorrt`` module. Its type is inferred from the import, so a type checker given the TensorRT stubs
        (``scripts/typecheck.sh``: ``tensorrt-stubs`` as pyright's ``stubPath``) checks every ``trt.X`` a caller
        uses; an annotation could only say ``ModuleType`` and would lose that.
    """
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError as exc:
        raise MissingDependencyError(
            f"TensorRT is not installed ({exc}). Install it on a machine with an NVIDIA GPU: "
            "pip install --extra-index-url https://pypi.nvidia.com tensorrt cuda-python, or use docker/Dockerfile.gpu"
        ) from None
    except OSError as exc:  # the wheel is there but its shared libraries are not
        raise MissingDependencyError(f"TensorRT is installed but its libraries cannot be loaded: {exc}") from None
    return trt


@dataclass(frozen=True, order=True)
class TrtVersion:
    major: int
    minor: int = 0
    patch: int = 0

    @classmethod
    def parse(cls, text: str) -> "TrtVersion":
        m = re.match(r"^\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text))
        if not m:
            raise ConfigError(f"cannot parse TensorRT version '{text}'")
        return cls(int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0))

    @property
    def strongly_typed_only(self) -> bool:
        """TensorRT 11 removed weak typing: no precision flags, no calibrators."""
        return self.major >= 11

    @property
    def supported(self) -> bool:
        return self.major in (10, 11)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def make_logger(sink: list[str]) -> tensorrt.ILogger:
    """A ``trt.ILogger`` that routes TensorRT's log through Python logging (``quantship.tensorrt``) and keeps
    error messages in ``sink`` for our own error messages."""
    trt = import_tensorrt()
    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.ERROR,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.INFO,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: tensorrt.ILogger.Severity, msg: str) -> None:  # noqa: A003 - TensorRT's interface
            level = levels.get(severity, logging.INFO)
            log.log(level, "%s", msg)
            if level >= logging.ERROR:
                sink.append(msg)

    return _Logger()


def engine_environment(trt: Any = None) -> dict[str, Any]:
    """TensorRT version and GPU of this machine (needs TensorRT and a GPU)."""

    trt = trt or import_tensorrt()
    return {"tensorrt": trt.__version__, **device_info()}


def check_engine_compatible(manifest: Mapping[str, Any], env: Mapping[str, Any], path: str = "engine") -> None:
    """Refuse an engine built with another TensorRT version or on another GPU, naming both.

    Raises:
        RuntimeBackendError: TensorRT version, GPU model or compute capability differ.
    """
    built = manifest.get("environment") or {}
    problems = []
    if built.get("tensorrt") and built["tensorrt"] != env.get("tensorrt"):
        problems.append(f"TensorRT {built['tensorrt']} (this machine: TensorRT {env.get('tensorrt')})")
    if built.get("compute_capability") and built["compute_capability"] != env.get("compute_capability"):
        problems.append(
            f"compute capability {built['compute_capability']} (this machine: {env.get('compute_capability')})"
        )
    if built.get("gpu") and built["gpu"] != env.get("gpu"):
        problems.append(f"GPU {built['gpu']} (this machine: {env.get('gpu')})")
    if problems:
        raise RuntimeBackendError(
            f"{path}: built with {'; '.join(problems)}. TensorRT engines only run on the TensorRT version and GPU "
            "model they were built with: rebuild it here (quantship convert --targets trt-...)"
        )
