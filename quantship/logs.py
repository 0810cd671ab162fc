"""Routing of native (C++) library chatter away from the console."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def redirect_native_output(log_path: str | os.PathLike | None) -> Iterator[None]:
    """Send everything written to file descriptors 1 and 2 (C++ logs of TensorFlow's converter, tf2onnx,
    absl) to ``log_path`` for the duration of the block. ``None`` leaves output alone."""
    if log_path is None:
        yield
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    # Python-level loggers of the libraries (absl, tf2onnx) write to sys.stderr: move them too.
    noisy = [logging.getLogger(n) for n in ("tensorflow", "absl", "tf2onnx", "h5py")]
    levels = [lg.level for lg in noisy]
    with open(log_path, "ab") as log:
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            for lg in noisy:
                lg.setLevel(logging.ERROR)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            for lg, lvl in zip(noisy, levels):
                lg.setLevel(lvl)


def route_native_stderr(log_path: str | os.PathLike) -> Callable[[], None]:
    """For the CLI: send file descriptor 2 (where TensorFlow, absl, LiteRT and ONNX Runtime write their C++
    messages) to ``log_path``, while ``sys.stderr`` keeps writing to the terminal, so our own messages,
    warnings and progress bars stay visible.

    Returns:
        A function that puts file descriptor 2 and ``sys.stderr`` back as they were (``main()`` calls it when
        it returns, so the CLI can run in-process, e.g. from tests).
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved_fd = os.dup(2)
    saved_stream = sys.stderr
    terminal = os.dup(2)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    os.dup2(log, 2)
    os.close(log)
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding="utf-8", errors="replace")

    def restore() -> None:
        ours = sys.stderr
        ours.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        sys.stderr = saved_stream
        ours.close()

    return restore
