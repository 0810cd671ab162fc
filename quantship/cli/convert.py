"""``quantship convert``: write the artifacts of the given targets (with manifests), or with
``--auto-fallback`` the int8 models with the fewest float layers that pass a gate."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantship.cli import args as a
from quantship.cli.registry import Command
from quantship.config import CalibrationSpec
from quantship.errors import ConfigError
from quantship.jobs.convert import ConvertSpec, run_convert
from quantship.jobs.sensitivity import Analyses, SensitivitySpec, checked_gate, run_sensitivity


def add_arguments(p: argparse.ArgumentParser) -> None:
    a.model(p)
    a.data(p, required=False, evaluation=False)
    a.runtime(p, batch=False)
    a.targets(p, "tflite-fp32,tflite-fp16,tflite-dynamic,tflite-int8,tflite-int16x8")
    a.out(p, "quantship-out")
    a.post_training(p)
    g = p.add_argument_group("float fallback")
    g.add_argument(
        "--auto-fallback",
        action="store_true",
        help="int8 TFLite + Q/DQ ONNX with the fewest float layers that pass --gate",
    )
    g.add_argument("--gate", help="with --auto-fallback: e.g. 'top1>=0.99' (relative to fp32) or 'drop<=0.5' (points)")
    g.add_argument(
        "--fallback-images",
        type=a.positive_int,
        default=200,
        help="held-out images for ranking and verifying the fallback",
    )
    g.add_argument("--fallback-method", default="max", help="calibration of the Q/DQ model (max)")
    g.add_argument(
        "--weighted-only",
        action="store_true",
        help="keep only layers with weights in float (by default also the softmax, residual adds, pooling and "
        "the output op where that is what the gate needs)",
    )
    a.remote(p)
    a.trt(p)
    a.common(p)


def run(args: argparse.Namespace) -> int:
    remote = a.remote_options(args)
    if args.auto_fallback:
        if remote is not None:
            raise ConfigError("--auto-fallback evaluates on this machine; it does not run with --remote")
        return _auto_fallback(args)

    spec = ConvertSpec(
        args.model, args.targets, Path(args.out), threads=args.threads, remote=remote, **a.convert_kwargs(args)
    )
    result = run_convert(spec)
    print(result.text)
    return result.exit_code


def _auto_fallback(args: argparse.Namespace) -> int:
    if not args.gate or not args.data:
        raise ConfigError(
            "--auto-fallback needs --gate (e.g. 'top1>=0.99') and --data (calibration and held-out images)"
        )
    analyses = Analyses(
        backends=("qdq", "tflite"),
        method=args.fallback_method,
        gate=checked_gate(args.gate, args.data),
        ops=not args.weighted_only,
    )
    spec = SensitivitySpec(
        model=args.model,
        weights=args.weights,
        data=args.data,
        labels=args.labels,
        images=args.fallback_images,
        calibration=CalibrationSpec(num_images=args.calib_images, list=args.calib_list),
        preprocess_overrides=a.preprocess(args),
        workers=args.workers,
        allow_missing_images=args.allow_missing_images,
        trust_savedmodel=args.trust_savedmodel,
    )
    result = run_sensitivity(
        spec, analyses, Path(args.out), threads=args.threads, jsonl_name="fallback.jsonl", report=False
    )
    print(result.text)
    return result.exit_code


COMMAND = Command("convert", "write the artifacts of the given targets (with manifests)", add_arguments, run)
