"""``quantship calibrate``: calibrate once; write a TensorRT cache, a Q/DQ ONNX model and/or ranges JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantship.cli import args as a
from quantship.cli.registry import Command
from quantship.config import CalibrationSpec
from quantship.jobs.calibrate import CalibrateSpec, run_calibrate


def add_arguments(p: argparse.ArgumentParser) -> None:
    a.model(p)
    a.data(p, evaluation=False, percentile=False)
    p.add_argument(
        "--method", default="entropy", help="max | entropy | percentile | mse | auto (per tensor; default entropy)"
    )
    p.add_argument("--percentile", type=float, help="percentile for --method percentile (default 99.99)")
    p.add_argument("--cache", help="write a TensorRT calibration cache here")
    p.add_argument("--qdq", help="write the Q/DQ ONNX model (TensorRT explicit quantization) here")
    p.add_argument("--ranges", help="write the per-tensor ranges as JSON here")
    p.add_argument("--exclude", help="comma-separated node or Keras layer names to keep in float in the Q/DQ model")
    p.add_argument("--trt-version", help="version field of the cache header (default that of TensorRT 10)")
    p.add_argument("--threads", type=a.positive_int, help="ONNX Runtime / histogram threads")
    a.out(p, "quantship-out", "folder for logs")
    a.common(p)


def run(args: argparse.Namespace) -> int:
    for option, value in (("--cache", args.cache), ("--qdq", args.qdq), ("--ranges", args.ranges)):
        a.check_output_file(option, value)

    spec = CalibrateSpec(
        model=args.model,
        weights=args.weights,
        data=args.data,
        labels=args.labels,
        method=args.method,
        percentile=args.percentile,
        cache=args.cache,
        qdq=args.qdq,
        ranges=args.ranges,
        exclude=a.names(args.exclude),
        calibration=CalibrationSpec(num_images=args.calib_images, seed=args.calib_seed, list=args.calib_list),
        preprocess_overrides=a.preprocess(args),
        workers=args.workers,
        threads=args.threads,
        trt_version=args.trt_version,
        log_path=Path(args.out) / "convert.log",
        allow_missing_images=args.allow_missing_images,
        trust_savedmodel=args.trust_savedmodel,
    )
    result = run_calibrate(spec)
    print(result.text)
    return result.exit_code


COMMAND = Command(
    "calibrate", "calibrate once; write a TensorRT cache, a Q/DQ ONNX model and/or ranges JSON", add_arguments, run
)
