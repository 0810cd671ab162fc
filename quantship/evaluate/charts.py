"""The report's charts, as PNG bytes (matplotlib, no display)."""

from __future__ import annotations

import io
import math
from typing import Any, Sequence


def _pyplot():
    # Lazy: pyplot takes ~0.5 s to import and only a report draws; the Agg backend is chosen before pyplot loads.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _place_labels(ax: Any, fig: Any, points: list[tuple[float, float, str]], fontsize: int = 7) -> list[tuple]:
    """Label each point where the label overlaps no other label, no point and stays inside the axes: try
    offsets around the point, nearest first, in display coordinates; draw a leader line when the label had to
    move away from its point."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    taken = []
    pts_px = [ax.transData.transform((x, y)) for x, y, _ in points]
    dots = [(px - 4, py - 4, px + 4, py + 4) for px, py in pts_px]
    around = ((1, 0.4), (1, -1), (-1, 0.4), (-1, -1), (0, 1), (0, -1.3), (1.5, 0), (-1.5, 0))
    candidates = [(r * dx, r * dy) for r in (6, 14, 24, 36, 50, 66) for dx, dy in around]
    for (x, y, text), (px, py) in zip(points, pts_px):
        probe = ax.annotate(text, (x, y), textcoords="offset points", xytext=(0, 0), fontsize=fontsize)
        bb = probe.get_window_extent(renderer)
        w, h = bb.width, bb.height
        probe.remove()
        scale = fig.dpi / 72.0
        chosen = None
        for dx, dy in candidates:
            left = px + dx * scale - (w if dx < 0 else 0)
            bottom = py + dy * scale - h / 2
            box = (left, bottom, left + w, bottom + h)
            if box[0] < inside.x0 or box[2] > inside.x1 or box[1] < inside.y0 or box[3] > inside.y1:
                continue
            if any(_overlap(box, other) for other in taken + dots):
                continue
            chosen = (dx, dy, box)
            break
        if chosen is None:  # nowhere free: the first candidate inside the axes
            chosen = (candidates[0][0], candidates[0][1], (px, py, px + w, py + h))
        dx, dy, box = chosen
        taken.append(box)
        far = max(abs(dx), abs(dy)) >= 12  # away from its point: a leader line says whose label it is
        ax.annotate(
            text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
            ha="right" if dx < 0 else "left", va="center",
            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.55"} if far else None,
        )  # fmt: skip
    return taken


def _overlap(a: tuple, b: tuple) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def _ms_formatter(value: float, _pos: Any) -> str:
    return f"{value:g}"


def accuracy_latency_chart(points: Sequence[tuple]) -> bytes | None:
    """PNG: accuracy (%) against latency (ms, log axis), one point per (model, target), every point labelled
    with its target without overlaps. ``points`` holds (model, target, latency ms, accuracy 0..1) and optionally
    a fifth item, (low ms, high ms) or None: a horizontal error bar (the interleaved bench's ratio interval)."""
    drawn = accuracy_latency_figure(points)
    return _png(drawn[0]) if drawn else None


def accuracy_latency_figure(points: Sequence[tuple]) -> tuple[Any, Any, list[tuple]] | None:
    """The chart's figure, axes and label boxes (display coordinates), before it is rendered to PNG."""
    points = [p for p in points if p[2] and p[2] > 0 and p[3] is not None and not math.isnan(p[3])]
    if not points:
        return None
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(8.0, 5.2), dpi=110)
    models = sorted({m for m, *_ in points})
    for mi, model in enumerate(models):
        mine = [p for p in points if p[0] == model]
        ax.scatter(
            [p[2] for p in mine], [100 * p[3] for p in mine], label=model or "model", s=36, color=f"C{mi}", zorder=3
        )
        bars = [p for p in mine if len(p) > 4 and p[4]]
        if bars:
            ax.errorbar(
                [p[2] for p in bars],
                [100 * p[3] for p in bars],
                xerr=[[max(p[2] - p[4][0], 0.0) for p in bars], [max(p[4][1] - p[2], 0.0) for p in bars]],
                fmt="none",
                ecolor=f"C{mi}",
                elinewidth=1.2,
                capsize=3,
                zorder=2,
            )
    ax.set_xscale("log")
    xs = [p[2] for p in points]
    ys = [100 * p[3] for p in points]
    lo, hi = min(xs), max(xs)
    ax.set_xlim(lo / 1.6, hi * 2.2)  # room on both sides for labels
    span = max(ys) - min(ys) or 1.0
    ax.set_ylim(min(ys) - 0.35 * span - 0.5, max(ys) + 0.35 * span + 0.5)
    # Major ticks at 1-2-5 with plain numbers; minor ticks unlabelled (matplotlib's default minor labels on a
    # short log axis run together, "3x10^1 4x10^1").
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(_ms_formatter))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(
        "latency, ms per image (log scale; bars: 95 % interval of the ratio to the reference, interleaved)"
        if any(len(p) > 4 and p[4] for p in points)
        else "latency, ms per image (log scale)"
    )
    ax.set_ylabel("top-1 accuracy or mAP, %")
    ax.grid(True, which="major", alpha=0.3)
    if len(models) > 1 or models[0]:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title("accuracy vs latency", fontsize=11)  # labels are kept inside the axes, clear of the title
    fig.tight_layout()
    boxes = _place_labels(ax, fig, [(p[2], 100 * p[3], p[1]) for p in sorted(points, key=lambda p: (p[2], -p[3]))])
    return fig, ax, boxes


def sensitivity_bars(rows: Sequence[dict], top: int = 30) -> tuple[str, list[str], dict[tuple[str, str], float]]:
    """What :func:`sensitivity_chart` draws: the axis label, the layers (most harmful first, at most ``top``) and
    the bar of each (backend, layer).

    Harm is 1 - top-1 agreement with fp32 where the rows have agreement, else the drop of their metric; a layer
    that helps (a negative drop) gets 0, so no bar is negative. When every harm is 0 (a small evaluation set on
    which no single layer changes a prediction) the bars are each layer's SQNR against fp32 instead, lowest
    first, which still ranks the layers."""
    single = [r for r in rows if r.get("kind") == "single"]

    def harm(r: dict) -> float:
        if r.get("agreement_top1") is not None:
            return max(0.0, 1.0 - r["agreement_top1"])
        return max(0.0, -(r.get("delta") or 0.0))

    def sqnr(r: dict) -> float:
        return min(float(r["sqnr_db"]), 100.0) if r.get("sqnr_db") is not None else 100.0

    by_sqnr = all(harm(r) == 0 for r in single) and any(r.get("sqnr_db") is not None for r in single)
    order: list[str] = []
    key = (lambda r: sqnr(r)) if by_sqnr else (lambda r: (-harm(r), sqnr(r)))
    for r in sorted(single, key=key):
        if r["layer"] not in order:
            order.append(r["layer"])
    bars = {(r["backend"], r["layer"]): (sqnr(r) if by_sqnr else harm(r)) for r in single}
    if by_sqnr:
        label = "SQNR vs fp32, dB (lowest first: no single layer changed a prediction on these images)"
    elif single and single[0].get("agreement_top1") is not None:
        label = "1 - top-1 agreement with fp32"
    else:
        label = f"drop of {single[0].get('metric', 'top1') if single else 'the metric'}"
    return label, order[:top], bars


def sensitivity_chart(rows: Sequence[dict], top: int = 30) -> bytes | None:
    """PNG: per-layer harm of quantizing that layer alone, per backend (see :func:`sensitivity_bars`)."""
    single = [r for r in rows if r.get("kind") == "single"]
    if not single:
        return None
    plt = _pyplot()
    label, order, by = sensitivity_bars(single, top)
    backends = sorted({r["backend"] for r in single})
    fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.28 * len(order) + 1)), dpi=110)
    height = 0.8 / len(backends)
    for bi, b in enumerate(backends):
        ys = [i + bi * height for i in range(len(order))]
        ax.barh(ys, [by.get((b, name), 0.0) for name in order], height=height, label=b, color=f"C{bi}")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(order))])
    ax.set_yticklabels(order, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0.0, max(max(by.values(), default=0.0) * 1.05, 1e-9 if label.startswith("SQNR") else 0.01))
    ax.set_xlabel(label, fontsize=8)
    ax.set_title(
        "per-layer quantization noise (that layer alone quantized)"
        if label.startswith("SQNR")
        else "per-layer quantization harm (that layer alone quantized)"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def sqnr_by_layer_chart(rows: Sequence[dict], ceiling_db: float = 100.0) -> bytes | None:
    """PNG: SQNR (dB) of one target against the reference at every compared layer in graph order, the first drop
    marked and named. ``rows`` are one target's ``kind: layer`` rows of ``diff.jsonl``; exact matches are drawn at
    ``ceiling_db``."""
    if not rows:
        return None
    plt = _pyplot()
    ys = [min(float(r["sqnr_db"]), ceiling_db) for r in rows]  # float("inf") for an exact match
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.07 * len(rows) + 3), 3.6), dpi=110)
    ax.plot(xs, ys, marker=".", ms=3, lw=1, color="C0")
    drop = next((i for i, r in enumerate(rows) if r.get("first_drop")), None)
    if drop is not None:
        ax.scatter([drop], [ys[drop]], s=50, color="C3", zorder=3)
        ax.annotate(
            f"first drop: {rows[drop]['layer']}", (drop, ys[drop]), textcoords="offset points", xytext=(6, -12),
            fontsize=8, color="C3",
        )  # fmt: skip
    every = max(1, len(rows) // 40)
    ax.set_xticks(xs[::every])
    ax.set_xticklabels([r["layer"] for r in rows][::every], rotation=90, fontsize=6)
    ax.set_ylabel("SQNR vs reference, dB")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{rows[0]['target']} vs {rows[0]['reference']}: SQNR by layer (graph order)", fontsize=10)
    fig.tight_layout()
    return _png(fig)
