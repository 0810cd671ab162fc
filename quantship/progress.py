"""One progress helper for the whole package; the CLI decides whether it shows anything."""

from __future__ import annotations

import logging
import sys
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
_enabled = False
log = logging.getLogger("quantship")


def set_enabled(enabled: bool) -> None:
    """Turn progress bars on (CLI on a terminal) or off (library use, tests)."""
    global _enabled
    _enabled = enabled


def track(iterable: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """Wrap ``iterable`` in a progress bar when enabled, else return it unchanged."""
    if not _enabled:
        yield from iterable
        return
    from tqdm import tqdm  # lazy: only when a bar is shown (stderr is a terminal)

    with tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        yield from bar


_note: Callable[[str], None] | None = None


def set_note(fn: Callable[[str], None] | None) -> None:
    """Where :func:`note` sends its lines (the CLI prints them; library use drops them)."""
    global _note
    _note = fn


def note(text: str) -> None:
    """A line about what a long job is doing now (shown by the CLI as it happens)."""
    if _note is not None:
        _note(text)
    else:
        log.info("%s", text)
