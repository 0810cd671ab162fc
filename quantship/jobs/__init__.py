"""Orchestration: the jobs the command line runs (eval, convert, calibrate, bench, sensitivity, signoff, report,
demo), as library functions. The only layer that builds artifacts and evaluates them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quantship.config import InputCacheOptions
from quantship.data.cache import configure

__all__ = ["JobResult", "use_input_cache"]  # each job's entry point: its module (eval, convert, calibrate, bench, ...)


@dataclass
class JobResult:
    """What a job hands back to its caller: its rows, the lines to show, the exit code it asks for."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    exit_code: int = 0

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def use_input_cache(options: InputCacheOptions) -> None:
    """Configure the preprocessed-input cache every pass of this process uses (``--input-cache DIR``,
    ``--no-input-cache``, ``--input-cache-max-gb``)."""
    configure(options)
