"""Argument groups shared by several commands, and argument types that check values as they are parsed."""

from __future__ import annotations

import argparse
import os
from typing import Any

from quantship.config import CalibrationSpec, PtqSteps, TrtOptions, parse_preprocess_overrides


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got '{text}'") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def names(text: str | None) -> list[str]:
    """A comma-separated list of names (layers, artifacts), blanks dropped."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging; native library output stays on the console"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def model(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, help="registry name (see 'quantship models') or a model file")
    g.add_argument(
        "--weights", help="weights file (.keras, .weights.h5, .h5, SavedModel dir), 'pretrained' or 'random'"
    )
    g.add_argument(
        "--preprocess",
        help="preprocessing overrides: mode=caffe|tf|torch|raw, size=224, crop_pct=0.875, "
        "interpolation=bilinear|bicubic|area, mean=a/b/c, std=a/b/c, channel_order=rgb|bgr, layout=nhwc|nchw, "
        "crops=center|10crop|12crop",
    )


def preprocess(args: argparse.Namespace) -> dict[str, Any]:
    return parse_preprocess_overrides(getattr(args, "preprocess", None))


def data(p: argparse.ArgumentParser, required: bool = True, calib_default: int = 100, evaluation: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        required=required,
        help="KIND:PATH, e.g. imagenet:/data/imagenet/val" + ("" if evaluation else " (calibration data)"),
    )
    g.add_argument("--labels", help="ground-truth file for a flat image folder (found in the folder by default)")
    if evaluation:
        g.add_argument("--limit", type=positive_int, help="evaluate only the first N images")
    g.add_argument(
        "--calib-images",
        type=positive_int,
        default=calib_default,
        help=f"calibration images{', disjoint from evaluation' if evaluation else ''} ({calib_default})",
    )
    g.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration draw")
    g.add_argument(
        "--workers", type=positive_int, default=max(2, min(8, os.cpu_count() or 2)), help="image decoding threads"
    )


def calibration(args: argparse.Namespace) -> CalibrationSpec:
    return CalibrationSpec(num_images=args.calib_images, seed=args.calib_seed)


def post_training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("post-training steps (Keras model of the quantized targets, before any export)")
    g.add_argument(
        "--equalize",
        action="store_true",
        help="cross-layer equalization of consecutive convolutions (batch norms folded first)",
    )
    g.add_argument(
        "--relu6",
        choices=("keep", "calibration", "relu"),
        default="keep",
        help="with --equalize, how to pass ReLU6: keep (a channel below the clip is scaled up until twice its "
        "calibration maximum reaches 6, never down), calibration (either way, as far as the clip stays exact on "
        "the calibration images), relu (ReLU6 becomes ReLU as in the published method; changes the float "
        "model). Default keep",
    )
    g.add_argument(
        "--bias-correct",
        action="store_true",
        help="remove the expected output shift of int8 weights from each bias (calibration statistics)",
    )


def ptq_steps(args: argparse.Namespace) -> PtqSteps:
    return PtqSteps(equalize=args.equalize, bias_correct=args.bias_correct, relu6=args.relu6)


def runtime(p: argparse.ArgumentParser, batch: bool = True) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--threads", type=positive_int, help="CPU threads of LiteRT / ONNX Runtime")
    if batch:
        g.add_argument("--batch-size", type=positive_int, default=8)


def targets(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--targets", default=default, help="comma-separated targets (see 'quantship targets')")


def out(p: argparse.ArgumentParser, default: str, what: str = "output folder") -> None:
    p.add_argument("--out", default=default, help=f"{what} (default {default})")


def trt(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TensorRT (trt-* targets; needs TensorRT and an NVIDIA GPU)")
    g.add_argument(
        "--trt-batch", default="1:8:32", help="batch optimization profile MIN:OPT:MAX, or N for a fixed batch"
    )
    g.add_argument("--trt-workspace-mb", type=positive_int, default=2048, help="builder workspace limit in MiB")
    g.add_argument("--trt-timing-cache", help="timing cache file (loaded if present, saved after the build)")
    g.add_argument(
        "--trt-calib-cache",
        help="TensorRT 10 calibration cache to use as given (e.g. from 'quantship calibrate --cache')",
    )
    g.add_argument(
        "--trt-qdq-method",
        help="calibration of the Q/DQ model behind trt-int8-qdq, the one target whose name carries no method "
        "(default entropy)",
    )
    g.add_argument("--trt-cuda-graph", action="store_true", help="run engines through captured CUDA graphs")


def trt_options(args: argparse.Namespace) -> TrtOptions:
    return TrtOptions(
        batch=args.trt_batch,
        workspace_mb=args.trt_workspace_mb,
        timing_cache=args.trt_timing_cache,
        calibration_cache=args.trt_calib_cache,
        qdq_method=args.trt_qdq_method,
        cuda_graph=args.trt_cuda_graph,
    )
