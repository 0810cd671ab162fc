"""Run a measurement in a fresh Python process (``python -m module``): JSON in on stdin, JSON out.

Each benchmark configuration gets its own process so that its initialisation time, peak memory and native
library state (LoadGen's one-time ``mlperf.conf``, thread pools) are its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable

from quantship import errors
from quantship.errors import QuantshipError, RuntimeBackendError


def run_worker(module: str, payload: dict[str, Any], what: str, timeout: float | None = None) -> dict[str, Any]:
    """Run ``python -m module`` with ``payload`` as JSON on stdin and return the JSON object it answers.

    Raises:
        QuantshipError: The error the worker raised, of the same type.
        RuntimeBackendError: The worker failed otherwise (the message is its last line of stderr).
    """
    proc = subprocess.run(
        [sys.executable, "-m", module],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise RuntimeBackendError(f"{what} failed: {err[-1] if err else 'no output'}")
    result = json.loads(lines[-1])
    if "_error" in result:
        kind = getattr(errors, result.get("_type", ""), None)
        if not (isinstance(kind, type) and issubclass(kind, QuantshipError)):
            kind = RuntimeBackendError
        raise kind(result["_error"])
    return result


def worker_main(run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The worker's side of :func:`run_worker`: read the payload, answer ``run(payload)`` as JSON.

    Native libraries (LoadGen, TensorRT) may write to stdout from C: fd 1 points at stderr while the work runs
    and the answer goes to the original stdout, so nothing lands after it. A :class:`QuantshipError` is
    answered as ``{"_error", "_type"}`` for the caller to raise again.
    """
    answer_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        result = run(json.loads(sys.stdin.read()))
    except QuantshipError as exc:
        result = {"_error": str(exc), "_type": type(exc).__name__}
    sys.stdout.flush()
    os.write(answer_fd, (json.dumps(result) + "\n").encode())
    os.close(answer_fd)
