"""One progress helper for the whole package; the CLI decides whether it shows anything."""

from __future__ import annotations

import logging
import sys
from typing import Iterable, Iterator, TypeVar

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
    from tqdm import tqdm

    with tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        yield from bar
