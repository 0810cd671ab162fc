"""``quantship models``: the registered architectures."""

from __future__ import annotations

import argparse

from quantship.cli import args as a
from quantship.cli.registry import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-stats", action="store_true", help="skip building models to count parameters and MACs")
    a.common(p)


def run(args: argparse.Namespace) -> int:
    from quantship.jobs.listing import list_models

    print(list_models(with_stats=not args.no_stats).text)
    return 0


COMMAND = Command("models", "list the registered architectures", add_arguments, run)
