"""``quantship models``: the registered architectures."""

from __future__ import annotations

import argparse

from quantship.cli import args as a
from quantship.cli.registry import Command
from quantship.jobs.listing import list_models


def add_arguments(p: argparse.ArgumentParser) -> None:
    stats = p.add_mutually_exclusive_group()
    stats.add_argument("--no-stats", action="store_true", help="leave out parameters and MACs")
    stats.add_argument(
        "--live-stats",
        action="store_true",
        help="count parameters and MACs by building every model (a minute or more) instead of reading the table "
        "committed with quantship; needed for models registered outside the package",
    )
    a.common(p)


def run(args: argparse.Namespace) -> int:
    print(list_models(with_stats=not args.no_stats, live_stats=args.live_stats).text)
    return 0


COMMAND = Command("models", "list the registered architectures", add_arguments, run)
