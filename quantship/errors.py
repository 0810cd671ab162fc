"""Typed exceptions. Library code raises these; only the CLI turns them into messages and exit codes."""


class QuantshipError(Exception):
    """Base class of every error quantship reports to the user."""

    exit_code = 2


class ConfigError(QuantshipError):
    """An unknown option, model, target or method name, or option values that do not fit together."""


class ModelLoadError(QuantshipError):
    """A model or weights file that cannot be read or does not fit the architecture."""


class DataError(QuantshipError):
    """A dataset that is missing, unreadable, malformed or smaller than asked."""


class ConversionError(QuantshipError):
    """A converter (TFLite, tf2onnx, TensorRT) failed."""


class RuntimeBackendError(QuantshipError):
    """A runtime could not load an artifact or run it (wrong input shape, corrupt file, ...)."""


class CalibrationError(QuantshipError):
    """The calibration feed or the collected statistics are unusable (empty, NaN/inf, wrong shape)."""


class MissingDependencyError(QuantshipError):
    """An optional dependency (TensorRT, CUDA, ...) that the requested feature needs is not installed."""


class UnsafePickleError(QuantshipError):
    """A pickle asked for something the restricted unpickler does not allow."""


class ExecutorError(QuantshipError):
    """A distributed run could not go on: the cluster is unreachable or unfit for the plan, a node cannot see
    the shared folder, or a unit raised on a worker (or its worker died more often than the retry limit)."""


class RemoteError(QuantshipError):
    """A remote device could not be used: unreachable, authentication or host key refused, no such interpreter,
    numpy or the artifact's runtime missing there, its disk full, or a malformed ``--remote`` URL."""


class RemoteConnectionLost(RemoteError):
    """The connection to the device (or its runner) dropped in the middle of a run; the rows measured before are
    kept and marked incomplete."""


class RemoteTimeout(RemoteConnectionLost):
    """The device runner did not answer a request within its deadline (a hung runtime, an engine build that never
    ends, a device that stopped answering without closing the connection): the runner was stopped, so the run
    lost it as if the connection had dropped (rows measured before are kept and marked incomplete)."""


# Errors that concern one target (its conversion, its runtime): that target fails, the others go on.
TARGET_ERRORS = (ConversionError, RuntimeBackendError, CalibrationError, MissingDependencyError)
