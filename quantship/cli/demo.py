"""``quantship demo``: a pretrained ImageNet model (EfficientNet-Lite0 by default) on sample photos, every target,
no data needed."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantship.cli import args as a
from quantship.cli.registry import Command
from quantship.jobs.demo import DEMO_MODELS, MODEL, run_demo


def add_arguments(p: argparse.ArgumentParser) -> None:
    a.out(p, "quantship-demo")
    p.add_argument(
        "--model",
        default=MODEL,
        choices=tuple(DEMO_MODELS),
        help=f"pretrained model (default {MODEL}; mobilenet_v2_tv: torchvision's MobileNetV2)",
    )
    p.add_argument("--threads", type=a.positive_int, default=2)
    a.post_training(p)
    a.common(p)


def run(args: argparse.Namespace) -> int:
    result = run_demo(Path(args.out), threads=args.threads, model=args.model, ptq=a.ptq_steps(args))
    print(result.text)
    return result.exit_code


COMMAND = Command(
    "demo",
    "pretrained EfficientNet-Lite0 (or MobileNetV2) on sample photos: every TFLite precision, ONNX and Q/DQ int8",
    add_arguments,
    run,
)
