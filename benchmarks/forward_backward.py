"""Forward and backward time of every classification network in the zoo, the figure Caffe's model tables carry
(`caffe time`: forward and backward at one image per batch; here medians, backward the median of the per-iteration
differences with its 95 % interval, "not resolved" when that interval reaches 0).

Each model runs in its own process through `quantship bench --forward-backward`'s code path (Keras, TensorFlow,
random weights, batch norm in training mode, cross-entropy against random labels, the gradient with respect to
every trainable weight): a short warm-up, then --iterations forward passes and forward+backward passes in
alternation. The table goes to stdout as Markdown (for the README), with the time the whole run took.

    python benchmarks/forward_backward.py [--iterations 20] [--batch 1] [--threads 2] [--models a,b,...]
    python benchmarks/forward_backward.py --smoke      # the smallest zoo model, 2 iterations: runs in seconds

Exit code 1 when a model failed (its table row says why).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="TensorFlow intra-op threads (default: TF's)")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds after tracing (0.5)")
    p.add_argument("--models", help="comma-separated (default: every classification model in the zoo)")
    p.add_argument("--jsonl", help="also write the rows here")
    p.add_argument("--smoke", action="store_true", help="mobilenet_0.25_128, 2 iterations: checks the script runs")
    args = p.parse_args()
    if args.smoke:
        args.models, args.iterations, args.warmup = "mobilenet_0.25_128", 2, 0.0

    from quantship.evaluate.environment import cpu_model
    from quantship.evaluate.fbtime import FBConfig, backward_text, forward_backward
    from quantship.models.registry import list_models

    names = args.models.split(",") if args.models else [m.name for m in list_models("classification")]
    start = time.perf_counter()
    load = os.getloadavg()[0]
    print(
        f"forward/backward, batch {args.batch}, {args.iterations} iterations each, TensorFlow CPU, "
        f"{args.threads or 'default'} threads; CPU {cpu_model()}, {os.cpu_count()} cores, load average {load:.2f}\n"
    )
    print("| model | params | forward ms | backward ms [95 % CI] | total ms | process s |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for name in names:
        t = time.perf_counter()
        cfg = FBConfig(name, "random", (args.batch,), args.warmup, args.iterations, 0.0, False, args.threads)
        try:
            (row,) = forward_backward([cfg])
        except Exception as exc:  # noqa: BLE001 - one model failing does not stop the table
            print(f"| {name} | failed: {str(exc)[:80]} | | | | |")
            continue
        row["process_s"] = time.perf_counter() - t
        rows.append(row)
        print(
            f"| {name} | {row['params'] / 1e6:.2f}M | {row['forward_ms']:.1f} | {backward_text(row, 1)} | "
            f"{row['total_ms']:.1f} | {row['process_s']:.0f} |",
            flush=True,
        )
    total = time.perf_counter() - start
    print(
        f"\n{len(rows)} models in {total:.0f} s ({total / 60:.1f} min); load average at the end "
        f"{os.getloadavg()[0]:.2f}"
    )
    if args.jsonl:
        Path(args.jsonl).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0 if len(rows) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
