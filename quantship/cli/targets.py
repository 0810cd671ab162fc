"""``quantship targets``: the evaluation targets."""

from __future__ import annotations

import argparse

from quantship.cli import args as a
from quantship.cli.registry import Command
from quantship.jobs.listing import list_target_lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    a.common(p)


def run(args: argparse.Namespace) -> int:
    print(list_target_lines().text)
    return 0


COMMAND = Command("targets", "list evaluation targets", add_arguments, run)
