"""The commands of ``quantship``, one module each (as Polygraphy's ``tools/registry.py``).

Each command module defines ``COMMAND``: its name, help line, how it adds its arguments and how it runs. The
modules are imported one by one; a command that fails to import is replaced by one that reports why, so one
broken command never takes the others down.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Callable

from quantship.errors import QuantshipError

MODULES = (
    "models",
    "targets",
    "eval",
    "convert",
    "calibrate",
    "bench",
    "signoff",
    "report",
    "sensitivity",
    "diff",
    "demo",
)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _broken(name: str, exc: Exception) -> Command:
    def run(args: argparse.Namespace) -> int:
        raise QuantshipError(f"this command cannot be loaded ({type(exc).__name__}: {exc})")

    return Command(name, f"(unavailable: {exc})", lambda p: None, run)


def load_commands() -> dict[str, Command]:
    """Every command, in the order of :data:`MODULES`."""
    out = {}
    for module in MODULES:
        try:
            command = importlib.import_module(f"quantship.cli.{module}").COMMAND
        except Exception as exc:  # noqa: BLE001 - one broken command must not break the others
            command = _broken(module, exc)
        out[command.name] = command
    return out
