"""Flat result rows -> JSON lines and Markdown tables. Reports are built from rows, never live objects."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from quantship.fileio import write_text_atomic

CLASSIFICATION_COLUMNS = (
    ("target", "target", "{}"),
    ("images", "images", "{}"),
    ("top1", "top-1", "{:.4f}"),
    ("delta_top1", "Δ top-1", "{:+.4f}"),
    ("top5", "top-5", "{:.4f}"),
    ("delta_top5", "Δ top-5", "{:+.4f}"),
    ("agreement_top1", "agree top-1", "{:.4f}"),
    ("latency_ms", "ms/image", "{:.2f}"),
    ("size_mb", "size MB", "{:.2f}"),
)


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def table_rows(rows: Sequence[dict], columns=CLASSIFICATION_COLUMNS) -> tuple[list[str], list[list[str]]]:
    header = [title for _, title, _ in columns]
    body = [[_fmt(r.get(key), fmt) for key, _, fmt in columns] for r in rows]
    return header, body


def markdown_table(rows: Sequence[dict], columns=CLASSIFICATION_COLUMNS) -> str:
    header, body = table_rows(rows, columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def text_table(rows: Sequence[dict], columns=CLASSIFICATION_COLUMNS) -> str:
    header, body = table_rows(rows, columns)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in body)])


def write_results(out_dir: Path, rows: Sequence[dict], title: str, notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write ``results.jsonl`` (one flat row per target) and ``results.md`` atomically."""
    out_dir = Path(out_dir)
    jsonl = write_text_atomic(out_dir / "results.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    md = [f"# {title}", "", markdown_table(rows), ""]
    md += [f"- {n}" for n in notes]
    md += ["", "## Artifacts", ""]
    md += [f"- `{r['target']}`: {r.get('artifact') or '(in memory)'}" for r in rows]
    mdp = write_text_atomic(out_dir / "results.md", "\n".join(md) + "\n")
    return jsonl, mdp
