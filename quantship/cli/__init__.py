"""The ``quantship`` command. Each subcommand is its own module (see :mod:`quantship.cli.registry`).

Only this package turns :class:`QuantshipError` into a message and an exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from quantship import __version__, progress
from quantship.cli.args import check_out_outside_data, input_cache_options
from quantship.cli.registry import load_commands
from quantship.config import max_image_pixels
from quantship.errors import QuantshipError
from quantship.fileio import cache_dir, check_output_dir, remove_unused_lock, sweep_temp_files
from quantship.jobs import use_input_cache
from quantship.logs import route_native_stderr

DATA_OPTIONS = ("--data", "--calib-data")  # folders --out must stay out of


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``quantship eval: error: argument --batch-size: expected a positive integer,
    got 0 (see 'quantship eval --help')``, exit code 2 (argparse's own prints the usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="quantship",
        description="Export Keras models to TFLite / ONNX / TensorRT, evaluate every runtime on the same data, "
        "sign off.",
    )
    parser.add_argument("--version", action="version", version=f"quantship {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands = load_commands()
    for command in commands.values():
        command.add_arguments(sub.add_parser(command.name, help=command.help))
    parser.set_defaults(_commands=commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (0 done, 1 a gate or check failed, 2 bad input, 130 interrupted).

    Safe to call in-process (tests): file descriptor 2, ``sys.stderr``, the SIGTERM handler and the progress
    hooks are put back as they were when it returns.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and argument errors (already printed on one line)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )

    try:
        max_image_pixels()  # a bad QUANTSHIP_MAX_IMAGE_PIXELS is named before any work
    except QuantshipError as exc:
        print(f"quantship {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    out = getattr(args, "out", None)
    if out is not None:
        # A file, a read-only or pseudo file system, a data folder where the results should go: say so before any
        # work ('' is refused too: it would write into the current folder).
        try:
            check_output_dir(out)
            check_out_outside_data(out, {o: getattr(args, o[2:].replace("-", "_"), None) for o in DATA_OPTIONS})
        except QuantshipError as exc:
            print(f"quantship {args.command}: error: {exc}", file=sys.stderr)
            return exc.exit_code
        sweep_temp_files(out)
    progress.set_enabled(not args.quiet and sys.stderr.isatty())
    progress.set_note(lambda text: print(text, flush=True))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    restore = None
    log_path = Path(out) / "native.log" if out else cache_dir() / "native.log"
    created = _missing_folders(log_path.parent)
    log_existed = log_path.exists()
    if not args.verbose:
        restore = route_native_stderr(log_path)
    restore_term = _terminate_as_interrupt()
    message = None
    try:
        if (cache_options := input_cache_options(args)) is not None:
            use_input_cache(cache_options)
        return args._commands[args.command].run(args)
    except QuantshipError as exc:
        message = f"quantship {args.command}: error: {exc}"
        return exc.exit_code
    except KeyboardInterrupt:
        message = f"quantship {args.command}: interrupted"
        return 130
    except BrokenPipeError:
        # The reader went away (`quantship models | head`): nothing more to say, and no traceback at exit when
        # Python flushes the closed stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        progress.set_note(None)
        if restore is not None:
            restore()
        restore_term()
        _tidy(log_path, log_existed, created)
        if message:  # after restoring: the caller's sys.stderr gets it (one line)
            print(" ".join(message.split()), file=sys.stderr)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its parents that do not exist yet (deepest first)."""
    out = []
    while not folder.exists() and folder != folder.parent:
        out.append(folder)
        folder = folder.parent
    return out


def _tidy(log_path: Path, log_existed: bool, created: list[Path]) -> None:
    """A run refused before any work leaves nothing behind: an empty native log it created goes, and so do the
    folders created for it if they hold nothing else (the released lock file of a job aside)."""
    try:
        if not log_existed and log_path.is_file() and log_path.stat().st_size == 0:
            log_path.unlink()
    except OSError:
        pass
    if created:
        remove_unused_lock(created[0])
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break


def _terminate_as_interrupt() -> Callable[[], None]:
    """``kill PID`` (SIGTERM) unwinds like Ctrl-C, so temporary files are removed on the way out; returns what
    puts the previous handler back (nothing to do outside the main thread, where signals cannot be set)."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
