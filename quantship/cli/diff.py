"""``quantship diff``: every intermediate tensor of each target against the first target's, layer by layer."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantship.cli import args as a
from quantship.cli.registry import Command
from quantship.jobs.diff import DiffSpec, run_diff


def add_arguments(p: argparse.ArgumentParser) -> None:
    a.model(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="KIND:PATH, e.g. imagenet:/data/imagenet/val")
    g.add_argument("--labels", help="ground-truth file for a flat image folder (found in the folder by default)")
    g.add_argument("--images", type=a.positive_int, default=16, help="images compared (16)")
    g.add_argument(
        "--calib-images",
        type=a.positive_int,
        default=100,
        help="calibration images of the int8 targets, disjoint from the compared ones (100)",
    )
    g.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration draw")
    a.calib_percentile(g)
    g.add_argument("--workers", type=a.positive_int, default=4, help="image decoding threads")
    a.runtime(p)
    a.targets(p, "keras-fp32,tflite-int8,qdq-int8-entropy,ort-int8-entropy")
    p.add_argument(
        "--drop-db",
        type=a.non_negative_float,
        default=10.0,
        help="mark the first layer whose SQNR is more than this many dB below its input's (10)",
    )
    # The Q/DQ targets as ONNX Runtime ran them before issue 12 (its fused int8 kernels, CPU-dependent).
    p.add_argument("--qdq-ort-defaults", action="store_true", help=argparse.SUPPRESS)
    a.out(p, "quantship-diff", "output folder (artifacts, diff.jsonl, report)")
    a.common(p)


def run(args: argparse.Namespace) -> int:
    spec = DiffSpec(
        model=args.model,
        data=args.data,
        targets=tuple(a.names(args.targets)),
        out_dir=Path(args.out),
        weights=args.weights,
        labels=args.labels,
        images=args.images,
        batch_size=args.batch_size,
        calibration=a.calibration(args),
        preprocess_overrides=a.preprocess(args),
        threads=args.threads,
        workers=args.workers,
        drop_db=args.drop_db,
        qdq_ort_defaults=args.qdq_ort_defaults,
    )
    print(f"quantship diff: {spec.model}, {', '.join(spec.targets)} on {spec.data} -> {spec.out_dir}")
    result = run_diff(spec, providers=args.ort_providers)
    print(result.text)
    return result.exit_code


COMMAND = Command(
    "diff",
    "where do two runtimes part ways: every intermediate tensor of each target against the first, per Keras layer",
    add_arguments,
    run,
)
