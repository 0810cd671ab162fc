"""Orchestration: the jobs the command line runs (eval, convert, calibrate, bench, sensitivity, signoff, report,
demo), as library functions. The only layer that builds artifacts and evaluates them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class JobResult:
    """What a job hands back to its caller: its rows, the lines to show, the exit code it asks for."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    exit_code: int = 0

    @property
    def text(self) -> str:
        return "\n".join(self.lines)
