"""``quantship sensitivity``: per-layer quantization sensitivity, weight-precision studies, float fallback."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantship.cli import args as a
from quantship.cli.registry import Command
from quantship.config import CalibrationSpec
from quantship.errors import ConfigError
from quantship.jobs.sensitivity import Analyses, SensitivitySpec, checked_gate, run_sensitivity


def add_arguments(p: argparse.ArgumentParser) -> None:
    a.model(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="KIND:PATH")
    g.add_argument("--labels")
    g.add_argument(
        "--allow-missing-images",
        action="store_true",
        help="evaluate the images present when the ground truth lists files the folder lacks",
    )
    g.add_argument("--images", type=a.positive_int, default=200, help="held-out images (200)")
    g.add_argument("--calib-images", type=a.positive_int, default=100)
    a.calibration_source(g)
    g.add_argument("--workers", type=a.positive_int, default=4)
    a.input_cache(p)
    p.add_argument("--anchors", help="anchor configuration (JSON) of a detection model given as a file")
    p.add_argument("--backend", default="qdq,tflite", help="qdq (Q/DQ ONNX on ONNX Runtime) and/or tflite (full int8)")
    p.add_argument(
        "--method", default="max", help="calibration of the Q/DQ model: max, entropy, percentile, mse or auto (max)"
    )
    p.add_argument("--cumulative", action="store_true", help="also quantize layers 0..k in order, row by row")
    p.add_argument("--depthwise", action="store_true", help="also compare pointwise/dense-only vs all layers quantized")
    p.add_argument("--weight-study", help="weight precisions: fp16,int8-tensor,int8-channel,mantissa:K")
    p.add_argument("--per-layer", action="store_true", help="weight study per layer too (not only all layers at once)")
    p.add_argument("--recipe", help="mixed weight recipe: layer=kind,layer=kind")
    a.post_training(p, auto=False)
    p.add_argument(
        "--gate",
        help="find float layers so int8 passes, e.g. 'top1>=0.99', 'mAP>=0.95', 'drop<=0.5'; without labels "
        "(--data images:PATH) 'agreement_top1>=0.99' or 'mean_l1<=0.1'",
    )
    p.add_argument(
        "--weighted-only",
        action="store_true",
        help="with --gate: keep only layers with weights in float (by default the fallback may also keep the "
        "softmax, residual adds, pooling and the output op in float)",
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="convert every TFLite variant from scratch through the quantization debugger (the slow path: it "
        "calibrates each time); the default calibrates once and only quantizes each variant, with the same numbers",
    )
    p.add_argument("--threads", type=a.positive_int, help="CPU threads of ONNX Runtime and LiteRT (every core)")
    p.add_argument("--show", type=a.positive_int, default=10, help="rows shown per backend")
    a.out(p, "quantship-sensitivity")
    a.common(p)


def recipe(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    out = {}
    for item in a.names(text):
        layer, sep, kind = item.partition("=")
        if not sep or not layer.strip() or not kind.strip():
            raise ConfigError(f"--recipe expects layer=kind pairs separated by commas, got '{item}'")
        out[layer.strip()] = kind.strip()
    return out


def run(args: argparse.Namespace) -> int:
    analyses = Analyses(
        backends=tuple(a.names(args.backend)),
        method=args.method,
        cumulative=args.cumulative,
        depthwise=args.depthwise,
        weight_kinds=tuple(a.names(args.weight_study)),
        per_layer=args.per_layer,
        recipe=recipe(args.recipe),
        gate=checked_gate(args.gate, args.data) if args.gate else None,
        ptq=a.ptq_steps(args),
        fast=not args.rebuild,
        ops=not args.weighted_only,
    )
    spec = SensitivitySpec(
        model=args.model,
        weights=args.weights,
        data=args.data,
        labels=args.labels,
        images=args.images,
        calibration=CalibrationSpec(num_images=args.calib_images, data=args.calib_data, list=args.calib_list),
        preprocess_overrides=a.preprocess(args),
        workers=args.workers,
        anchors=args.anchors,
        allow_missing_images=args.allow_missing_images,
        trust_savedmodel=args.trust_savedmodel,
    )
    result = run_sensitivity(spec, analyses, Path(args.out), threads=args.threads, show=args.show)
    print(result.text)
    return result.exit_code


COMMAND = Command(
    "sensitivity",
    "per-layer quantization sensitivity, weight-precision studies, float fallback for a gate",
    add_arguments,
    run,
)
