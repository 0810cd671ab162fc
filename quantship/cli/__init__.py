"""The ``quantship`` command. Each subcommand is its own module (see :mod:`quantship.cli.registry`).

Only this package turns :class:`QuantshipError` into a message and an exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from quantship import __version__
from quantship.errors import QuantshipError


def build_parser() -> argparse.ArgumentParser:
    from quantship.cli.registry import load_commands

    parser = argparse.ArgumentParser(
        prog="quantship",
        description="Export Keras models to TFLite / ONNX / TensorRT, evaluate every runtime on the same data, "
        "sign off.",
    )
    parser.add_argument("--version", action="version", version=f"quantship {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = load_commands()
    for command in commands.values():
        command.add_arguments(sub.add_parser(command.name, help=command.help))
    parser.set_defaults(_commands=commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from quantship import progress
    from quantship.fileio import cache_dir
    from quantship.logs import route_native_stderr

    progress.set_enabled(not args.quiet and sys.stderr.isatty())
    progress.set_note(lambda text: print(text, flush=True))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    restore = None
    if not args.verbose:
        out = getattr(args, "out", None)
        restore = route_native_stderr(Path(out) / "native.log" if out else cache_dir() / "native.log")
    try:
        from quantship.cli.args import input_cache_options

        if (cache_options := input_cache_options(args)) is not None:
            from quantship.jobs.common import use_input_cache

            use_input_cache(cache_options)
        return args._commands[args.command].run(args)
    except QuantshipError as exc:
        print(f"quantship {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"quantship {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        progress.set_note(None)
        if restore is not None:
            restore()


if __name__ == "__main__":
    sys.exit(main())
