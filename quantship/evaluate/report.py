"""Reports rebuilt from stored results alone: Markdown and one self-contained HTML file.

Reads whatever a results folder holds: ``results.jsonl`` (eval/demo), ``signoff.jsonl`` + ``verdicts.jsonl``
(sign-off), ``bench.jsonl`` (latency), ``environment.json`` and the manifests the rows point at.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

from quantship.errors import DataError
from quantship.evaluate.results import markdown_table
from quantship.fileio import read_jsonl, write_bytes_atomic, write_text_atomic

ACCURACY_COLUMNS = (
    ("model", "model", "{}"),
    ("target", "target", "{}"),
    ("images", "images", "{}"),
    ("top1", "top-1", "{:.4f}"),
    ("top5", "top-5", "{:.4f}"),
    ("delta_top1", "Δ top-1", "{:+.4f}"),
    ("mAP", "mAP", "{:.4f}"),
    ("delta_mAP", "Δ mAP", "{:+.4f}"),
    ("latency_ms", "ms/image (eval)", "{:.2f}"),
    ("skipped", "skipped", "{}"),
)
VERDICT_COLUMNS = (
    ("model", "model", "{}"),
    ("target", "target", "{}"),
    ("gate", "gate", "{}"),
    ("target_value", "value", "{:.4f}"),
    ("reference_value", "reference", "{:.4f}"),
    ("delta_points", "Δ points", "{:+.2f}"),
    ("ci", "CI", "{}"),
    ("verdict", "verdict", "{}"),
)
BENCH_COLUMNS = (
    ("target", "target", "{}"),
    ("threads", "threads", "{}"),
    ("latency_ms_p50", "p50 ms", "{:.2f}"),
    ("latency_ms_p90", "p90 ms", "{:.2f}"),
    ("latency_ms_p99", "p99 ms", "{:.2f}"),
    ("latency_ms_mean", "mean ms", "{:.2f}"),
    ("throughput", "images/s", "{:.1f}"),
    ("init_ms", "init ms", "{:.0f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("size_mb", "size MB", "{:.2f}"),
    ("warning", "warning", "{}"),
)


def load_results(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"results folder not found: {folder}")
    data = {
        "rows": read_jsonl(folder / "signoff.jsonl") or read_jsonl(folder / "results.jsonl"),
        "verdicts": read_jsonl(folder / "verdicts.jsonl"),
        "bench": read_jsonl(folder / "bench.jsonl"),
        "sensitivity": read_jsonl(folder / "sensitivity.jsonl"),
        "environment": _environment(folder / "environment.json"),
    }
    _check_rows(folder / "verdicts.jsonl", data["verdicts"], VERDICT_KEYS)
    rows_file = "signoff.jsonl" if (folder / "signoff.jsonl").is_file() else "results.jsonl"
    _check_rows(folder / rows_file, data["rows"], ("target",))
    _check_rows(folder / "bench.jsonl", data["bench"], ("target",))
    if not data["rows"] and not data["bench"] and not data["sensitivity"]:
        raise DataError(f"{folder}: no stored results (results.jsonl, signoff.jsonl, bench.jsonl or sensitivity.jsonl)")
    for r in data["sensitivity"]:
        if isinstance(r.get("float_layers"), list):
            r["float_layers_text"] = ", ".join(r["float_layers"]) or "-"
        if isinstance(r.get("prediction_check"), list):
            r["prediction_text"] = " | ".join(r["prediction_check"])
    for r in data["rows"]:
        if "delta_top1" not in r:
            ref = next(
                (x for x in data["rows"] if x.get("model") == r.get("model") and x["target"] == "keras-fp32"), None
            )
            if ref is not None and r.get("top1") is not None:
                r["delta_top1"] = r["top1"] - ref["top1"]
    for v in data["verdicts"]:
        v["ci"] = (
            f"[{v['ci_low']:+.4g}, {v['ci_high']:+.4g}]"
            if v["kind"] == "drop_points"
            else f"[{v['ci_low']:.4f}, {v['ci_high']:.4f}]"
        )
        v["verdict"] = "PASS" if v["passed"] else "FAIL"
    from quantship.evaluate.bench import display_fields

    for b in data["bench"]:
        display_fields(b)
    manifests = {}
    for r in data["rows"]:
        m = r.get("manifest")
        if m and Path(m).is_file():
            try:
                manifests[r["target"] if not r.get("model") else f"{r['model']} / {r['target']}"] = json.loads(
                    Path(m).read_text()
                )
            except json.JSONDecodeError:
                continue
    data["manifests"] = manifests
    return data


def _environment(path: Path) -> dict[str, Any]:
    """The stored environment, or a :class:`DataError` naming the file when it is not a JSON object."""
    if not path.is_file():
        return {}
    try:
        env = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: corrupt ({exc}); delete it (the next run writes it again)") from None
    if not isinstance(env, dict):
        raise DataError(f"{path}: expected a JSON object; delete it (the next run writes it again)")
    return env


VERDICT_KEYS = ("model", "target", "passed", "kind", "ci_low", "ci_high")


def _check_rows(path: Path, rows: list[dict[str, Any]], keys: Sequence[str]) -> None:
    """Stored rows hold the fields the report needs; one that does not is named (file, row, missing keys)."""
    for i, v in enumerate(rows, 1):
        missing = [k for k in keys if not isinstance(v, dict) or k not in v]
        missing += [k for k in keys if k in ("ci_low", "ci_high") and k in v and not _is_number(v[k])]
        if missing:
            raise DataError(
                f"{path}: row {i} lacks {', '.join(missing)} (or holds no number there); run the command again to "
                "rewrite it from its results"
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _latency_for(data: dict[str, Any], row: dict[str, Any]) -> float | None:
    for b in data["bench"]:
        if b.get("target", "").split("@")[0] == row["target"] and b.get("model", row.get("model")) == row.get("model"):
            return b.get("latency_ms_p50")
    return row.get("latency_ms_p50") or row.get("latency_ms")


def _accuracy(row: dict[str, Any]) -> float | None:
    return row.get("mAP") if row.get("task") == "detection" else row.get("top1")


def accuracy_latency_chart(data: dict[str, Any]) -> bytes:
    """PNG: top-1 against latency, one point per (model, target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    models = sorted({r.get("model", "") for r in data["rows"]})
    for mi, model in enumerate(models):
        pts = [(r, _latency_for(data, r), _accuracy(r)) for r in data["rows"] if r.get("model", "") == model]
        pts = [(r, x, y) for r, x, y in pts if x is not None and y is not None and not math.isnan(y)]
        if not pts:
            continue
        ax.scatter([x for _, x, _ in pts], [100 * y for _, _, y in pts], label=model or "model", s=40, color=f"C{mi}")
        # Targets often tie on accuracy: stagger the labels of neighbouring points so they stay readable.
        for i, (r, x, y) in enumerate(sorted(pts, key=lambda p: p[1])):
            ax.annotate(
                r["target"],
                (x, 100 * y),
                textcoords="offset points",
                xytext=(4, 4 + 8 * (i % 6)),
                fontsize=7,
                arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.6"} if i % 6 else None,
            )
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms per image (log scale)")
    ax.set_ylabel("top-1 accuracy or mAP, %")
    ax.set_title("accuracy vs latency")
    ax.grid(True, alpha=0.3)
    if models:
        ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


SENSITIVITY_TABLES = {
    "single": (
        "Layer sensitivity (one layer quantized, the rest float), most harmful first",
        (
            ("backend", "backend", "{}"),
            ("rank", "rank", "{}"),
            ("layer", "layer", "{}"),
            ("top1", "top-1", "{:.4f}"),
            ("delta_top1", "Δ top-1", "{:+.4f}"),
            ("agreement_top1", "agree w/ fp32", "{:.4f}"),
            ("sqnr_db", "SQNR dB", "{:.1f}"),
        ),
    ),
    "cumulative": (
        "Cumulative (layers 0..k quantized)",
        (
            ("backend", "backend", "{}"),
            ("quantized_layers", "k", "{}"),
            ("layer", "up to layer", "{}"),
            ("top1", "top-1", "{:.4f}"),
            ("agreement_top1", "agree w/ fp32", "{:.4f}"),
            ("sqnr_db", "SQNR dB", "{:.1f}"),
        ),
    ),
    "depthwise_vs_pointwise": (
        "Depthwise vs pointwise",
        (
            ("backend", "backend", "{}"),
            ("setting", "quantized", "{}"),
            ("quantized_layers", "layers", "{}"),
            ("top1", "top-1", "{:.4f}"),
            ("agreement_top1", "agree w/ fp32", "{:.4f}"),
            ("sqnr_db", "SQNR dB", "{:.1f}"),
        ),
    ),
    "weights": (
        "Weight precision (Keras model, activations float)",
        (
            ("precision", "weights", "{}"),
            ("layers", "layers", "{}"),
            ("top1", "top-1", "{:.4f}"),
            ("agreement_top1", "agree w/ fp32", "{:.4f}"),
            ("sqnr_db", "SQNR dB", "{:.1f}"),
            ("prediction_text", "prediction check (first images)", "{}"),
        ),
    ),
    "fallback": (
        "Float fallback search",
        (
            ("backend", "backend", "{}"),
            ("float_layers_text", "float layers", "{}"),
            ("top1", "top-1", "{:.4f}"),
            ("agreement_top1", "agree w/ fp32", "{:.4f}"),
            ("passed", "gate", "{}"),
        ),
    ),
    "fallback_cost": (
        "What the fallback costs",
        (
            ("backend", "backend", "{}"),
            ("variant", "model", "{}"),
            ("float_layers_text", "float layers", "{}"),
            ("top1", "top-1", "{:.4f}"),
            ("agreement_top1", "agree w/ fp32", "{:.4f}"),
            ("size_mb", "size MB", "{:.2f}"),
            ("latency_ms_p50", "p50 ms", "{:.2f}"),
        ),
    ),
}


def sensitivity_chart(rows: Sequence[dict], top: int = 30) -> bytes | None:
    """PNG: per-layer harm (1 - top-1 agreement with fp32) of quantizing that layer alone, per backend."""
    single = [r for r in rows if r.get("kind") == "single"]
    if not single:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = sorted({r["backend"] for r in single})
    order = []
    for r in sorted(single, key=lambda r: (r["agreement_top1"], r["sqnr_db"])):
        if r["layer"] not in order:
            order.append(r["layer"])
    order = order[:top]
    harm = {(r["backend"], r["layer"]): 1.0 - r["agreement_top1"] for r in single}
    fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.28 * len(order) + 1)), dpi=110)
    height = 0.8 / len(backends)
    for bi, b in enumerate(backends):
        ys = [i + bi * height for i in range(len(order))]
        ax.barh(ys, [harm.get((b, name), 0.0) for name in order], height=height, label=b, color=f"C{bi}")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(order))])
    ax.set_yticklabels(order, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("1 - top-1 agreement with fp32 (that layer alone quantized)")
    ax.set_title("per-layer quantization harm")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _html_table(rows: Sequence[dict], columns) -> str:
    from quantship.evaluate.results import table_rows

    header, body = table_rows(rows, columns)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = []
    for cells in body:
        tds = "".join(
            f'<td class="{"fail" if c == "FAIL" else "pass" if c == "PASS" else ""}">{html.escape(c)}</td>'
            for c in cells
        )
        trs.append(f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(trs)}</tbody></table>"


def build_report(folder: Path, title: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` (+ ``report_chart.png``) and a self-contained ``report.html`` into ``folder``."""
    folder = Path(folder)
    data = load_results(folder)
    title = title or f"quantship report: {folder.name}"
    chart = accuracy_latency_chart(data) if data["rows"] else None
    env = data["environment"]
    n_fail = sum(1 for v in data["verdicts"] if not v["passed"])
    verdict = None
    if data["verdicts"]:
        verdict = (
            f"{'FAIL' if n_fail else 'PASS'}: {len(data['verdicts']) - n_fail} of {len(data['verdicts'])} gates passed"
        )

    md = [f"# {title}", ""]
    if verdict:
        md += [f"**{verdict}**", ""]
    if chart:
        write_bytes_atomic(folder / "report_chart.png", chart)
        md += ["![accuracy vs latency](report_chart.png)", ""]
    if data["verdicts"]:
        md += ["## Gates", "", markdown_table(data["verdicts"], VERDICT_COLUMNS), ""]
    if data["rows"]:
        md += ["## Accuracy", "", markdown_table(data["rows"], ACCURACY_COLUMNS), ""]
    if data["bench"]:
        md += ["## Latency", "", markdown_table(data["bench"], BENCH_COLUMNS), ""]
    sens_chart = sensitivity_chart(data["sensitivity"]) if data["sensitivity"] else None
    if sens_chart:
        write_bytes_atomic(folder / "sensitivity_chart.png", sens_chart)
        md += ["## Quantization sensitivity", "", "![per-layer harm](sensitivity_chart.png)", ""]
    for kind, (heading, cols) in SENSITIVITY_TABLES.items():
        rows_k = [r for r in data["sensitivity"] if r.get("kind") == kind]
        if rows_k:
            md += [f"### {heading}", "", markdown_table(rows_k, cols), ""]
    if env:
        md += ["## Environment", "", f"- CPU: {env.get('cpu')} ({env.get('cpu_count')} cores)"]
        md += [f"- {k}: {v}" for k, v in sorted(env.get("libraries", {}).items())] + [""]
    if data["manifests"]:
        md += ["## Artifacts", ""]
        for name, m in data["manifests"].items():
            md += [f"### {name}", "", "```json", json.dumps(m, indent=2, sort_keys=True), "```", ""]
    md_path = write_text_atomic(folder / "report.md", "\n".join(md) + "\n")

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}th{background:#f3f3f3}"
        "td:first-child,td:nth-child(2){text-align:left}.pass{color:#176117;font-weight:bold}"
        ".fail{color:#b00020;font-weight:bold}"
        "pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if verdict:
        parts.append(f"<p class='{'fail' if n_fail else 'pass'}'>{html.escape(verdict)}</p>")
    if chart:
        parts.append(f"<img alt='accuracy vs latency' src='data:image/png;base64,{base64.b64encode(chart).decode()}'>")
    if data["verdicts"]:
        parts += ["<h2>Gates</h2>", _html_table(data["verdicts"], VERDICT_COLUMNS)]
    if data["rows"]:
        parts += ["<h2>Accuracy</h2>", _html_table(data["rows"], ACCURACY_COLUMNS)]
    if data["bench"]:
        parts += ["<h2>Latency</h2>", _html_table(data["bench"], BENCH_COLUMNS)]
    if sens_chart:
        parts += [
            "<h2>Quantization sensitivity</h2>",
            f"<img alt='per-layer harm' src='data:image/png;base64,{base64.b64encode(sens_chart).decode()}'>",
        ]
    for kind, (heading, cols) in SENSITIVITY_TABLES.items():
        rows_k = [r for r in data["sensitivity"] if r.get("kind") == kind]
        if rows_k:
            parts += [f"<h3>{html.escape(heading)}</h3>", _html_table(rows_k, cols)]
    if env:
        libs = "".join(
            f"<li>{html.escape(k)}: {html.escape(str(v))}</li>" for k, v in sorted(env.get("libraries", {}).items())
        )
        parts += [
            "<h2>Environment</h2>",
            f"<p>CPU: {html.escape(str(env.get('cpu')))} ({env.get('cpu_count')} cores)</p><ul>{libs}</ul>",
        ]
    if data["manifests"]:
        parts.append("<h2>Artifacts</h2>")
        for name, m in data["manifests"].items():
            text = html.escape(json.dumps(m, indent=2, sort_keys=True))
            parts.append(f"<details><summary>{html.escape(name)}</summary><pre>{text}</pre></details>")
    parts.append("</body></html>")
    html_path = write_text_atomic(folder / "report.html", "\n".join(parts))
    return md_path, html_path
