"""Flat result rows -> JSON lines and Markdown tables. Reports are built from rows, never live objects."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from quantship.fileio import write_text_atomic

Columns = tuple[tuple[str, str, str], ...]  # (row key, heading, format)


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def table_rows(rows: Sequence[dict], columns: Columns) -> tuple[list[str], list[list[str]]]:
    header = [title for _, title, _ in columns]
    body = [[_fmt(r.get(key), fmt) for key, _, fmt in columns] for r in rows]
    return header, body


def markdown_table(rows: Sequence[dict], columns: Columns) -> str:
    header, body = table_rows(rows, columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def text_table(rows: Sequence[dict], columns: Columns) -> str:
    header, body = table_rows(rows, columns)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in body)])


def per_class_ap_markdown(rows: Sequence[dict]) -> list[str]:
    """The per-class AP table of detection rows (one column per target), or nothing."""
    rows = [r for r in rows if isinstance(r.get("per_class_ap"), dict)]
    if not rows:
        return []
    classes = list(rows[0]["per_class_ap"])
    label = lambda r: f"{r['model']} / {r['target']}" if len({x.get("model") for x in rows}) > 1 else r["target"]  # noqa: E731
    md = [
        "## Per-class AP (VOC07 11-point)",
        "",
        "| class | " + " | ".join(label(r) for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for c in classes:
        md.append(f"| {c} | " + " | ".join(_fmt(r["per_class_ap"].get(c), "{:.4f}") for r in rows) + " |")
    return md + [""]


def write_results(
    out_dir: Path, rows: Sequence[dict], title: str, notes: Sequence[str], columns: Columns
) -> tuple[Path, Path]:
    """Write ``results.jsonl`` (one flat row per target) and ``results.md`` atomically."""
    out_dir = Path(out_dir)
    jsonl = write_text_atomic(out_dir / "results.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    md = [f"# {title}", "", markdown_table(rows, columns), ""]
    md += [f"- {n}" for n in notes]
    md += [""] + per_class_ap_markdown(rows)
    md += ["", "## Artifacts", ""]
    md += [f"- `{r['target']}`: {r.get('artifact') or '(in memory)'}" for r in rows]
    mdp = write_text_atomic(out_dir / "results.md", "\n".join(md) + "\n")
    return jsonl, mdp
