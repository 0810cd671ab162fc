"""``quantship targets``: the evaluation targets."""

from __future__ import annotations

import argparse

from quantship.cli import args as a
from quantship.cli.registry import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    a.common(p)


def run(args: argparse.Namespace) -> int:
    from quantship.targets import list_targets

    for t in list_targets():
        print(f"{t.name:24s} {t.spec.description}")
    return 0


COMMAND = Command("targets", "list evaluation targets", add_arguments, run)
