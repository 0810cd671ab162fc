"""``quantship eval``: every target on the same images, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantship.cli import args as a
from quantship.cli.registry import Command
from quantship.errors import ConfigError
from quantship.jobs.eval import EvalSpec, run_eval
from quantship.jobs.listing import DEFAULT_TARGETS

DETECTION_KINDS = ("voc2007", "coco")


def add_arguments(p: argparse.ArgumentParser) -> None:
    a.model(p)
    a.data(p)
    a.runtime(p)
    a.targets(p, ",".join(DEFAULT_TARGETS))
    a.post_training(p)
    a.out(p, "quantship-out", "output folder (artifacts, results.jsonl, results.md)")
    p.add_argument(
        "--task",
        choices=("classification", "detection"),
        help="checked against the dataset's task (voc2007:/coco: are detection)",
    )
    p.add_argument("--anchors", help="anchor configuration (JSON) of a detection model given as a file")
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="a target whose outputs hold NaN or inf on some images (counted in the rows, scored as wrong) does "
        "not fail the run (exit 1 by default)",
    )
    a.remote(p)
    a.trt(p)
    a.common(p)


def run(args: argparse.Namespace) -> int:
    if args.task:
        kind = args.data.split(":", 1)[0]
        if (kind in DETECTION_KINDS) != (args.task == "detection"):
            raise ConfigError(
                f"--task {args.task} does not fit --data {kind}:... (voc2007 and coco are detection, imagenet "
                "is classification)"
            )
    spec = EvalSpec(
        model=args.model,
        data=args.data,
        targets=args.targets.split(","),
        out_dir=Path(args.out),
        weights=args.weights,
        labels=args.labels,
        limit=args.limit,
        batch_size=args.batch_size,
        threads=args.threads,
        workers=args.workers,
        calibration=a.calibration(args),
        preprocess_overrides=a.preprocess(args),
        trt=a.trt_options(args),
        anchors=args.anchors,
        providers=args.ort_providers,
        allow_nonfinite=args.allow_nonfinite,
        allow_missing_images=args.allow_missing_images,
        trust_savedmodel=args.trust_savedmodel,
        ptq=a.ptq_steps(args),
        remote=a.remote_options(args),
    )
    print(
        f"quantship eval: {spec.model} on {spec.data} -> {spec.out_dir} (converter log: {spec.out_dir / 'convert.log'})"
    )
    result = run_eval(spec)
    print(result.text)
    return result.exit_code


COMMAND = Command("eval", "evaluate targets on a dataset, side by side", add_arguments, run)
