"""``quantship bench``: latency percentiles, throughput, init time, peak memory (each config in its own process)."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantship.cli import args as a
from quantship.cli.registry import Command
from quantship.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", action="append", default=[], help="a .tflite / .onnx / .engine file (repeatable)")
    a.model(p, required=False)
    a.data(p, required=False, evaluation=False)
    a.targets(p, "tflite-fp32,tflite-fp16,tflite-int8")
    a.runtime(p, batch=False)
    p.add_argument(
        "--mobile",
        action="store_true",
        help="mobile-class CPU profile: LiteRT on 1, 2 and 4 threads pinned to fixed cores",
    )
    p.add_argument(
        "--batch-sizes",
        default="1",
        help="comma-separated; batch 1 gives the latency percentiles, each gives a throughput",
    )
    p.add_argument("--warmup", type=a.non_negative_float, default=1.0, help="warm-up seconds (1)")
    p.add_argument("--min-queries", type=a.positive_int, default=200, help="at least this many timed queries (200)")
    p.add_argument("--min-seconds", type=a.non_negative_float, default=5.0, help="and at least this many seconds (5)")
    a.out(p, "quantship-bench")
    a.trt(p)
    a.common(p)


def run(args: argparse.Namespace) -> int:
    from quantship.jobs.bench import run_bench

    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        raise ConfigError(f"--batch-sizes must be integers separated by commas, got '{args.batch_sizes}'") from None
    convert = dict(
        targets=args.targets,
        weights=args.weights,
        data=args.data,
        labels=args.labels,
        calib_images=args.calib_images,
        calib_seed=args.calib_seed,
        calib_list=args.calib_list,
        calib_percentile=args.calib_percentile,
        preprocess_overrides=a.preprocess(args),
        workers=args.workers,
        trt=a.trt_options(args),
        allow_missing_images=args.allow_missing_images,
        trust_savedmodel=args.trust_savedmodel,
    )
    result = run_bench(
        Path(args.out),
        args.artifact,
        model=args.model,
        convert=convert,
        threads=args.threads,
        mobile=args.mobile,
        batch_sizes=batch_sizes,
        warmup_seconds=args.warmup,
        min_queries=args.min_queries,
        min_seconds=args.min_seconds,
        cuda_graph=args.trt_cuda_graph,
        providers=args.ort_providers,
    )
    print(result.text)
    return result.exit_code


COMMAND = Command(
    "bench",
    "latency: percentiles, throughput, init time, peak memory (each config in its own process)",
    add_arguments,
    run,
)
