"""Reports rebuilt from stored results alone: Markdown and one self-contained HTML file.

Reads whatever a results folder holds: ``results.jsonl`` (eval/demo), ``signoff.jsonl`` + ``verdicts.jsonl`` +
``plan.json`` (sign-off), ``bench.jsonl`` (latency), ``sensitivity.jsonl``, ``predictions.jsonl`` (the demo's
prediction check), ``environment.json`` and the manifests the rows point at. The page reads top-down the way a
release manager decides: the verdict first, then the tables, then the chart and the details.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from quantship.errors import DataError
from quantship.evaluate.bench import display_fields
from quantship.evaluate.charts import accuracy_latency_chart, sensitivity_chart, sqnr_by_layer_chart
from quantship.evaluate.diff import DIFF_COLUMNS, display_rows
from quantship.evaluate.results import Columns, markdown_table, per_class_ap_markdown, table_rows
from quantship.evaluate.verdicts import overall_verdict
from quantship.fileio import write_bytes_atomic, write_text_atomic

ACCURACY_COLUMNS = (
    ("model", "model", "{}"),
    ("target", "target", "{}"),
    ("status", "status", "{}"),
    ("images", "images", "{}"),
    ("top1", "top-1", "{:.4f}"),
    ("top5", "top-5", "{:.4f}"),
    ("delta_top1", "Δ top-1", "{:+.4f}"),
    ("agreement_top1", "agree top-1", "{:.4f}"),
    ("mean_l1", "mean L1", "{:.4f}"),
    ("mAP", "mAP", "{:.4f}"),
    ("delta_mAP", "Δ mAP", "{:+.4f}"),
    ("latency_ms", "ms/image (eval)", "{:.2f}"),
    ("threads", "threads", "{}"),
    ("providers_text", "ORT providers", "{}"),
    ("skipped", "skipped", "{}"),
)
VERDICT_COLUMNS = (
    ("model", "model", "{}"),
    ("target", "target", "{}"),
    ("gate", "gate", "{}"),
    ("rule", "decided on", "{}"),
    ("images", "images", "{}"),
    ("target_value", "value", "{:.4f}"),
    ("reference_value", "reference", "{:.4f}"),
    ("delta_points", "Δ points", "{:+.2f}"),
    ("ci", "interval", "{}"),
    ("ci_method", "interval method", "{}"),
    ("verdict_text", "verdict", "{}"),
    ("settle", "images to settle", "{}"),
)
BENCH_COLUMNS = (
    ("target", "target", "{}"),
    ("threads", "threads", "{}"),
    ("latency_ms_p50", "p50 ms", "{:.2f}"),
    ("latency_ms_p90", "p90 ms", "{:.2f}"),
    ("latency_ms_p99", "p99 ms", "{:.2f}"),
    ("latency_ms_mean", "mean ms", "{:.2f}"),
    ("runtime_ms_p50", "runtime p50 ms", "{:.2f}"),
    ("latency_cov", "CoV", "{:.2f}"),
    ("ratio_display", "vs reference [95% interval]", "{}"),
    ("throughput", "images/s", "{:.1f}"),
    ("throughput_batch", "at batch", "{}"),
    ("init_ms", "init ms", "{:.0f}"),
    ("first_inference_ms", "1st inference ms", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("size_mb", "size MB", "{:.2f}"),
    ("execution", "execution", "{}"),
    ("stable_display", "stable", "{}"),
    ("warning", "warning", "{}"),
)
OTHER_COLUMNS = (
    ("model", "model", "{}"),
    ("target", "target", "{}"),
    ("status", "status", "{}"),
    ("unit_key", "key", "{}"),
)
_SENS_HEAD = (("backend", "backend", "{}"),)
_SENS_TAIL = (
    ("metric", "metric", "{}"),
    ("value", "value", "{:.4f}"),
    ("delta", "Δ", "{:+.4f}"),
    ("agreement_top1", "agree w/ fp32", "{:.4f}"),
    ("sqnr_db", "SQNR dB", "{:.1f}"),
)
SENSITIVITY_TABLES: dict[str, tuple[str, Columns]] = {
    "single": (
        "Layer sensitivity (one layer quantized, the rest float), most harmful first",
        (*_SENS_HEAD, ("rank", "rank", "{}"), ("layer", "layer", "{}"), *_SENS_TAIL),
    ),
    "cumulative": (
        "Cumulative (layers 0..k quantized)",
        (*_SENS_HEAD, ("quantized_layers", "k", "{}"), ("layer", "up to layer", "{}"), *_SENS_TAIL),
    ),
    "depthwise_vs_pointwise": (
        "Depthwise vs pointwise",
        (*_SENS_HEAD, ("setting", "quantized", "{}"), ("quantized_layers", "layers", "{}"), *_SENS_TAIL),
    ),
    "weights": (
        "Weight precision (Keras model, activations float)",
        (
            ("precision", "weights", "{}"),
            ("layers", "layers", "{}"),
            *_SENS_TAIL,
            ("prediction_text", "prediction check (first images)", "{}"),
        ),
    ),  # fmt: skip
    "fallback": (
        "Float fallback search",
        (*_SENS_HEAD, ("float_layers_text", "float layers", "{}"), *_SENS_TAIL, ("passed", "gate", "{}")),
    ),
    "fallback_cost": (
        "What the fallback costs",
        (
            *_SENS_HEAD,
            ("variant", "model", "{}"),
            ("float_layers_text", "float layers", "{}"),
            *_SENS_TAIL,
            ("size_mb", "size MB", "{:.2f}"),
            ("latency_ms_p50", "p50 ms", "{:.2f}"),
        ),
    ),  # fmt: skip
}


# ------------------------------------------------------------------------------------------ reading


def _read_jsonl_strict(path: Path) -> list[dict[str, Any]]:
    """JSON lines; a torn last line (a kill mid-write) is ignored, any other bad line is an error."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue
            raise DataError(
                f"{path}:{n}: not a JSON row; the file is damaged (run the job again to rewrite it)"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object per line")
        rows.append(row)
    return rows


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: {what} is not valid JSON ({exc}); run the job again to rewrite it") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: {what} must be a JSON object")
    return data


VERDICT_KEYS = ("model", "target", "gate", "verdict")
ROW_KEYS = ("target",)  # what every result row is reported by


def load_results(folder: Path) -> dict[str, Any]:
    """Everything a results folder stores, checked, with display fields added.

    Raises:
        DataError: No results, or a damaged file (named, with the line).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"results folder not found: {folder}")
    plan = _read_json(folder / "plan.json", "the sign-off plan record")
    rows = _read_jsonl_strict(folder / "signoff.jsonl") or _read_jsonl_strict(folder / "results.jsonl")
    other: list[dict[str, Any]] = []
    if "unit_keys" in plan:  # a sign-off: the report covers exactly the current plan
        keys = list(plan["unit_keys"])
        by_key = {r.get("unit_key"): r for r in rows}
        rows, other = [by_key[k] for k in keys if k in by_key], [r for k, r in by_key.items() if k not in set(keys)]
        agreement = {a.get("unit_key"): a for a in _read_jsonl_strict(folder / "agreement.jsonl")}
        rows = [{**r, **agreement.get(r.get("unit_key"), {})} for r in rows]
    data = {
        "plan": plan,
        "rows": rows,
        "other_rows": other,
        "verdicts": _read_jsonl_strict(folder / "verdicts.jsonl"),
        "bench": _read_jsonl_strict(folder / "bench.jsonl"),
        "sensitivity": _read_jsonl_strict(folder / "sensitivity.jsonl"),
        "predictions": _read_jsonl_strict(folder / "predictions.jsonl"),
        "verdict": _read_json(folder / "verdict.json", "the job's verdict record"),
        "diff": _read_jsonl_strict(folder / "diff.jsonl"),
        "environment": _read_json(folder / "environment.json", "the environment record"),
        "folder": folder,
    }
    if not (data["rows"] or data["bench"] or data["sensitivity"] or data["diff"]):
        raise DataError(
            f"{folder}: no stored results (results.jsonl, signoff.jsonl, bench.jsonl, sensitivity.jsonl or diff.jsonl)"
        )
    for n, v in enumerate(data["verdicts"], 1):
        missing = [k for k in VERDICT_KEYS if k not in v]
        if missing:
            raise DataError(
                f"{folder / 'verdicts.jsonl'}:{n}: verdict row lacks {', '.join(missing)}; run the sign-off again"
            )
        _verdict_display(v)
    for r in data["sensitivity"]:
        if isinstance(r.get("float_layers"), list):
            r["float_layers_text"] = ", ".join(r["float_layers"]) or "-"
        if isinstance(r.get("prediction_check"), list):
            r["prediction_text"] = " | ".join(r["prediction_check"])
    name = "signoff.jsonl" if (folder / "signoff.jsonl").is_file() else "results.jsonl"
    for n, r in enumerate(data["rows"], 1):
        missing = [k for k in ROW_KEYS if k not in r]
        if missing:
            raise DataError(f"{folder / name}: row {n} lacks {', '.join(missing)}; run the job again to rewrite it")
    for r in data["rows"]:
        r.setdefault("status", "ok")
        if isinstance(r.get("providers"), list):
            r["providers_text"] = ", ".join(p.replace("ExecutionProvider", "") for p in r["providers"])
        if "delta_top1" not in r and r.get("top1") is not None:
            ref = next(
                (x for x in data["rows"] if x.get("model") == r.get("model") and x["target"] == "keras-fp32"), None
            )
            if ref is not None and ref.get("top1") is not None:
                r["delta_top1"] = r["top1"] - ref["top1"]

    for b in data["bench"]:
        display_fields(b)
    # A model given as a file is shown by its file name (the full path once, under "Models"): a path in every
    # row would make each table as wide as the path.
    data["model_paths"] = {}
    for group in ("rows", "other_rows", "verdicts", "bench", "sensitivity"):
        for r in data[group]:
            m = r.get("model")
            if isinstance(m, str) and ("/" in m or "\\" in m):
                r["model"] = Path(m).name
                data["model_paths"][r["model"]] = m
    data["manifests"] = _manifests(data["rows"])
    return data


_KIND_UNITS = {"drop_points": "points", "relative": "ratio"}


def _verdict_display(v: dict[str, Any]) -> None:
    """Display fields of a verdict row: its interval with its unit (points, ratio, fraction, ...), the verdict
    as shown (an underpowered PASS says so) and the images that would settle it."""
    lo, hi = v.get("ci_low"), v.get("ci_high")
    if lo is None or hi is None:
        v["ci"] = v.get("error", "-")
    else:
        unit = v.get("unit") or _KIND_UNITS.get(v.get("kind", ""), "fraction")
        fmt = "{:+.2f}" if unit == "points" else "{:.4f}"
        method = v.get("interval", "")
        conf = f"{100 * v['confidence']:g}% " if v.get("confidence") else ""
        v["ci"] = f"[{fmt.format(lo)}, {fmt.format(hi)}] {unit}"
        v["ci_method"] = f"{conf}{method}".strip() or None
    v["verdict_text"] = "PASS (underpowered)" if v.get("verdict") == "PASS" and v.get("underpowered") else v["verdict"]
    v["settle"] = v.get("images_to_settle") if v.get("verdict") == "INCONCLUSIVE" or v.get("underpowered") else None


def _manifests(rows: Sequence[dict]) -> dict[str, Any]:
    out = {}
    for r in rows:
        m = r.get("manifest")
        if m and Path(m).is_file():
            try:
                out[r["target"] if not r.get("model") else f"{r['model']} / {r['target']}"] = json.loads(
                    Path(m).read_text()
                )
            except (json.JSONDecodeError, OSError):
                continue
    return out


def _latency_row(data: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """The bench row of ``row``'s target (a bench pass's latency wins over the evaluation's), else ``row``."""
    for b in data["bench"]:
        if b.get("target", "").split("@")[0] == row["target"] and b.get("model", row.get("model")) == row.get("model"):
            return b
    return row


def _latency_for(data: dict[str, Any], row: dict[str, Any]) -> float | None:
    lat = _latency_row(data, row)
    return lat.get("latency_ms_p50") or lat.get("latency_ms")


def _latency_interval(data: dict[str, Any], row: dict[str, Any]) -> tuple[float, float] | None:
    """The ratio's 95 % interval carried onto the latency axis (p50 x low / ratio .. p50 x high / ratio): how
    precisely this point's position relative to its reference is known; None without an interleaved ratio, and
    for the reference itself."""
    lat = _latency_row(data, row)
    p50, ratio = lat.get("latency_ms_p50"), lat.get("ratio_to_reference")
    if not p50 or not ratio or lat.get("ratio_ci_low") is None or lat.get("reference") == lat.get("target"):
        return None
    return p50 * lat["ratio_ci_low"] / ratio, p50 * lat["ratio_ci_high"] / ratio


def _accuracy(row: dict[str, Any]) -> float | None:
    return row.get("mAP") if row.get("task") == "detection" else row.get("top1")


# ------------------------------------------------------------------------------------------ document


@dataclass
class _Doc:
    """A report as a list of blocks, rendered to Markdown and to self-contained HTML alike."""

    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def para(self, text: str, css: str = "") -> None:
        self.blocks.append(("para", (text, css)))

    def table(self, rows: Sequence[dict], columns: Columns) -> None:
        """A table of the columns some row fills (a label-free run has no top-1 column of dashes)."""
        held = tuple(c for c in columns if any(r.get(c[0]) is not None for r in rows)) or columns
        self.blocks.append(("table", (rows, held)))

    def image(self, png: bytes, name: str, alt: str) -> None:
        self.blocks.append(("image", (png, name, alt)))

    def markdown_lines(self, lines: list[str]) -> None:
        """Markdown-only lines (tables of their own); HTML gets them preformatted."""
        self.blocks.append(("raw", lines))

    def details(self, name: str, text: str) -> None:
        self.blocks.append(("details", (name, text)))

    def photos(self, cards: list[PhotoCard]) -> None:
        self.blocks.append(("photos", cards))

    def markdown(self, folder: Path) -> str:
        md: list[str] = []
        for kind, value in self.blocks:
            if kind == "heading":
                md += ["#" * value[0] + " " + value[1], ""]
            elif kind == "para":
                md += [f"**{value[0]}**" if value[1] else value[0], ""]
            elif kind == "table":
                md += [markdown_table(*value), ""]
            elif kind == "image":
                write_bytes_atomic(folder / value[1], value[0])
                md += [f"![{value[2]}]({value[1]})", ""]
            elif kind == "raw":
                md += [*value, ""]
            elif kind == "details":
                md += [f"### {value[0]}", "", "```json", value[1], "```", ""]
            elif kind == "photos":
                for card in value:
                    md += [f"### {card.name}", ""] + ([f"![{card.name}]({card.path})", ""] if card.path else [])
                    md += [f"*{m}*  " for m in card.meta] + [""]
                    md += [f"- **{text}**" if differs else f"- {text}" for text, differs in card.lines] + [""]
        return "\n".join(md) + "\n"

    def html(self, title: str) -> str:
        parts = [
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
            # Without the viewport a phone lays the page out 980 px wide and shrinks it to unreadable text.
            "<meta name='viewport' content='width=device-width, initial-scale=1'>",
            f"<title>{html.escape(title)}</title>",
            f"<style>{REPORT_CSS}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
        ]
        for kind, value in self.blocks:
            if kind == "heading":
                parts.append(f"<h{value[0]}>{html.escape(value[1])}</h{value[0]}>")
            elif kind == "para":
                parts.append(f"<p class='{value[1]}'>{html.escape(value[0])}</p>")
            elif kind == "table":
                parts.append(_html_table(*value))
            elif kind == "image":
                parts.append(f"<img alt='{html.escape(value[2])}' src='data:image/png;base64,{_b64(value[0])}'>")
            elif kind == "raw":
                parts.append(f"<pre>{html.escape(chr(10).join(value))}</pre>")
            elif kind == "details":
                parts.append(
                    f"<details><summary>{html.escape(value[0])}</summary><pre>{html.escape(value[1])}</pre></details>"
                )
            elif kind == "photos":
                cards = []
                for card in value:
                    img = (
                        f"<img alt='{html.escape(card.name)}' src='data:image/png;base64,{_b64(card.png)}'>"
                        if card.png
                        else ""
                    )
                    meta = "".join(f"<div class='meta'>{html.escape(m)}</div>" for m in card.meta)
                    items = "".join(
                        f"<li class='{'differs' if differs else ''}'>{html.escape(text)}</li>"
                        for text, differs in card.lines
                    )
                    cards.append(f"<div class='card'><b>{html.escape(card.name)}</b>{meta}{img}<ul>{items}</ul></div>")
                parts.append(f"<div class='photos'>{''.join(cards)}</div>")
        parts.append("</body></html>")
        return "\n".join(parts)


# Wide content scrolls inside its own box (tables, preformatted text), never the page: a phone keeps the
# verdict and the text readable at its width. Images shrink to the page width.
REPORT_CSS = (
    "*{box-sizing:border-box}"
    "body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222;"
    "line-height:1.4}"
    "h1{font-size:1.5em;overflow-wrap:anywhere}h2{font-size:1.25em}h3{font-size:1.05em}"
    "p{overflow-wrap:anywhere}"
    ".scroll{overflow-x:auto;max-width:100%;margin:0.6em 0 1.4em}"
    "table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right;white-space:nowrap}"
    "th{background:#f3f3f3;vertical-align:bottom}"
    "td:first-child,td:nth-child(2),td:nth-child(3),th:first-child,th:nth-child(2),th:nth-child(3){text-align:left}"
    # A long text cell (a model file's path, a long gate) wraps within a bounded width instead of widening the
    # whole table.
    "td.long{white-space:normal;overflow-wrap:anywhere;min-width:min(16em,45vw);max-width:28em}"
    "img{max-width:100%;height:auto}"
    ".pass{color:#176117;font-weight:bold}.fail{color:#b00020;font-weight:bold}"
    ".inconclusive,.underpowered{color:#9a6700;font-weight:bold}"
    ".verdict{font-size:1.3em;margin:0.4em 0 1em;padding:0.4em 0.6em;border-left:6px solid currentColor;"
    "background:#fafafa}"
    "pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto;max-width:100%}"
    "details{max-width:100%}"
    ".photos{display:flex;flex-wrap:wrap;gap:16px}"
    ".card{border:1px solid #ddd;padding:8px;width:380px;max-width:100%}"
    ".card img{max-width:160px;width:40%;float:left;margin:0 8px 4px 0}"
    ".card .meta{font-size:13px;margin:2px 0 6px}"
    ".card ul{font-size:12px;padding-left:1.1em;clear:both;margin:4px 0;overflow-wrap:anywhere}"
    ".differs{color:#b00020;font-weight:bold}"
)


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode()


def _html_table(rows: Sequence[dict], columns: Columns) -> str:
    header, body = table_rows(rows, columns)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    css = {
        "PASS": "pass", "FAIL": "fail", "INCONCLUSIVE": "inconclusive", "failed": "fail",
        "PASS (underpowered)": "underpowered",
    }  # fmt: skip
    trs = [
        "<tr>"
        + "".join(f'<td class="{css.get(c, "long" if len(c) > 32 else "")}">{html.escape(c)}</td>' for c in cells)
        + "</tr>"
        for cells in body
    ]
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(trs)}</tbody></table></div>"


# ------------------------------------------------------------------------------------------ building


def _verdict_section(doc: _Doc, data: dict[str, Any]) -> None:
    verdicts = data["verdicts"]
    failed_units = [r for r in data["rows"] if r.get("status") == "failed"]
    own = data.get("verdict") or {}
    if not verdicts and own.get("verdict"):  # a job with its own rule (the demo's prediction check)
        doc.para(f"{own['verdict']}: {own.get('text', '')}", f"verdict {str(own['verdict']).lower()}")
        return
    if not verdicts:
        doc.para(
            "No gates: a plain evaluation, no pass/fail verdict."
            + (" Some targets FAILED to run." if failed_units else "")
        )
        return

    overall = overall_verdict(verdicts, len(failed_units))
    doc.para(overall.headline, f"verdict {overall.css}")
    doc.table(verdicts, VERDICT_COLUMNS)
    rules = sorted({v.get("rule", "point") for v in verdicts})
    doc.para(
        "Decided on: 'point' = the point value over all evaluated images (as MLPerf judges); 'interval' = PASS only "
        "when the whole interval clears the gate, FAIL when it misses it entirely, otherwise INCONCLUSIVE. "
        "PASS (underpowered): the point value clears the gate but the interval does not, so these images cannot "
        "show it would on more; 'images to settle' estimates how many would. Intervals: 'exact' = "
        "guaranteed-coverage interval (top-k against labels: paired; agreement with the reference: "
        "Clopper-Pearson); 'bootstrap' = bootstrap over images (mAP, distances; approximate). Rules used "
        f"here: {', '.join(rules)}."
    )


def _chart_points(data: dict[str, Any]) -> list[tuple]:
    return [
        (r.get("model", ""), r["target"], _latency_for(data, r), _accuracy(r), _latency_interval(data, r))
        for r in data["rows"]
        if r.get("status", "ok") == "ok"
    ]


@dataclass
class PhotoCard:
    """One evaluated photo of a prediction check: its thumbnail, what is known about it (ground truth, whether
    it was judged) and each target's top-3, marked where the target's top-1 differs from fp32's."""

    name: str
    png: bytes | None
    path: str | None
    meta: list[str]
    lines: list[tuple[str, bool]]  # (text, top-1 differs from the reference's)


def _photo_cards(data: dict[str, Any], folder: Path) -> list[PhotoCard]:
    cards: dict[str, PhotoCard] = {}
    reference: dict[str, str] = {}
    for p in data["predictions"]:
        name = p.get("photo", "?")
        top = p.get("top3") or [["?", 0.0]]
        if name not in cards:
            thumb = p.get("thumbnail")
            png = (folder / thumb).read_bytes() if thumb and (folder / thumb).is_file() else None
            # The first target of a photo is the reference (keras-fp32 leads the demo's targets).
            reference[name] = top[0][0]
            meta = [f"ground truth: {p['truth']}" if p.get("truth") else "ground truth: not known"]
            if "judged" in p:
                meta.append(
                    f"judged: fp32's top-1 {top[0][0]} with p = {top[0][1]:.2f}"
                    if p["judged"]
                    else f"not judged: fp32 is not confident (top-1 {top[0][0]}, p = {top[0][1]:.2f})"
                )
            cards[name] = PhotoCard(name, png, thumb if png else None, meta, [])
        differs = top[0][0] != reference[name]
        text = f"{p.get('target')}: " + ", ".join(f"{label} {prob:.2f}" for label, prob in top)
        cards[name].lines.append((text + ("  ← top-1 differs from fp32" if differs else ""), differs))
    return list(cards.values())


def _executor_text(ex: dict[str, Any]) -> str:
    """Where a sign-off's units ran (a Ray run: its cluster, nodes, workers and the retries of dead workers)."""
    if ex.get("nodes") == 0:
        return f"{ex.get('executor')} (nothing ran: every unit was stored)"
    text = f"{ex.get('executor', 'local')}, {ex.get('nodes', 1)} node(s), {ex.get('workers', 1)} worker(s)"
    if ex.get("executor") == "ray":
        text += (
            f" ({ex.get('cluster', 'cluster')}; {ex.get('cpus', '?')} CPUs, {ex.get('gpus', 0)} GPUs); "
            f"{ex.get('retries', 0)} task retries (at most {ex.get('max_retries', '?')} per task)"
        )
        if ex.get("retried"):
            text += ": " + ", ".join(ex["retried"])
    return text


def _diff_section(doc: _Doc, rows: list[dict[str, Any]]) -> None:
    """``quantship diff``: per target, its SQNR-by-layer chart, the first drop and the layer table."""

    doc.heading("Layer by layer against the reference (quantship diff)")
    for s in [r for r in rows if r.get("kind") == "summary"]:
        doc.heading(s["target"], 3)
        if s.get("status") == "failed":
            doc.para(f"FAILED: {s.get('error', '')}")
            continue
        mine = [r for r in rows if r.get("kind") == "layer" and r.get("target") == s["target"]]
        chart = sqnr_by_layer_chart(mine)
        if chart:
            doc.image(chart, f"diff_sqnr_{s['target']}.png", f"SQNR by layer, {s['target']}")
        config = ", ".join(f"{k}={v}" for k, v in (s.get("session_config") or {}).items()) or "default"
        drop = s.get("first_drop_layer")
        doc.para(
            f"{s['images']} images; session options: {config}; first layer more than {s['drop_db']:g} dB below its "
            f"input: {drop or 'none'}. " + " ".join(s.get("notes", []))
        )
        doc.table(display_rows(mine), DIFF_COLUMNS)


def build_report(folder: Path, title: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` (+ its PNGs) and a self-contained ``report.html`` into ``folder``."""
    folder = Path(folder)
    data = load_results(folder)
    plan_name = data["plan"].get("name")
    # `quantship report` on a folder keeps the title its job gave it: the plan's name, the demo's own.
    title = (
        title
        or (f"sign-off: {plan_name}" if plan_name else None)
        or data["verdict"].get("title")
        or f"quantship report: {folder.name}"
    )
    doc = _Doc()
    if data["rows"]:
        _verdict_section(doc, data)
        doc.heading("Accuracy")
        doc.table(data["rows"], ACCURACY_COLUMNS)
        failed = [r for r in data["rows"] if r.get("status") == "failed"]
        for r in failed:
            doc.para(f"FAILED {r.get('model', '')} {r['target']}: {r.get('error', '')}")
        per_class = per_class_ap_markdown(data["rows"])
        if per_class:
            doc.markdown_lines(per_class)
        chart = accuracy_latency_chart(_chart_points(data))
        if chart:
            doc.image(chart, "report_chart.png", "accuracy vs latency")
    if data["predictions"]:
        doc.heading("Prediction check (top-3 per target)")
        judged = sorted({p.get("photo") for p in data["predictions"] if p.get("judged")})
        photos = sorted({p.get("photo") for p in data["predictions"]})
        if any("judged" in p for p in data["predictions"]):
            doc.para(
                f"Judged: {len(judged)} of {len(photos)} photos ({', '.join(judged) or 'none'}), those where fp32 is "
                "confident; a target's line is marked where its top-1 differs from fp32's."
            )
        doc.photos(_photo_cards(data, folder))
    if data["bench"]:
        doc.heading("Latency")
        doc.table(data["bench"], BENCH_COLUMNS)
    sens_chart = sensitivity_chart(data["sensitivity"]) if data["sensitivity"] else None
    if sens_chart:
        doc.heading("Quantization sensitivity")
        doc.image(sens_chart, "sensitivity_chart.png", "per-layer harm")
    for kind, (heading, cols) in SENSITIVITY_TABLES.items():
        rows_k = [r for r in data["sensitivity"] if r.get("kind") == kind]
        if rows_k:
            doc.heading(heading, 3)
            doc.table(rows_k, cols)
    if data["diff"]:
        _diff_section(doc, data["diff"])
    if data["other_rows"]:
        doc.heading("Stored results not in this plan")
        doc.para("Kept on disk (state/ and signoff.jsonl) and reused if the plan asks for exactly these inputs again.")
        doc.table(data["other_rows"], OTHER_COLUMNS)
    if data["model_paths"]:
        doc.heading("Models")
        doc.markdown_lines([f"- {name}: {path}" for name, path in sorted(data["model_paths"].items())])
    env = data["environment"]
    if env:
        doc.heading("Environment")
        lines = [f"- CPU: {env.get('cpu')} ({env.get('cpu_count')} cores; int8 flags: {env.get('cpu_flags', '-')})"]
        if isinstance(env.get("executor"), dict):
            lines.append(f"- Executor: {_executor_text(env['executor'])}")
        lines += [f"- {k}: {v}" for k, v in sorted((env.get("libraries") or {}).items())]
        doc.markdown_lines(lines)
    if data["manifests"]:
        doc.heading("Artifacts")
        for name, m in data["manifests"].items():
            doc.details(name, json.dumps(m, indent=2, sort_keys=True))
    md_path = write_text_atomic(folder / "report.md", f"# {title}\n\n" + doc.markdown(folder))
    html_path = write_text_atomic(folder / "report.html", doc.html(title))
    return md_path, html_path


__all__ = ["BENCH_COLUMNS", "VERDICT_COLUMNS", "build_report", "load_results"]
