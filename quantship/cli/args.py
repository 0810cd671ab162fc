"""Argument groups shared by several commands, and argument types that check values as they are parsed."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable

from quantship.config import (
    AUTO_HOLD_OUT_EVERY,
    AUTO_MIN_HELD_OUT,
    AdaRoundOptions,
    CalibrationSpec,
    InputCacheOptions,
    PreprocessSpec,
    PtqSteps,
    RemoteOptions,
    TrtOptions,
    check_ort_provider_names,
    parse_preprocess_overrides,
    parse_ssh_option,
)
from quantship.errors import ConfigError
from quantship.fileio import check_output_dir


def _number(cast: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse type: ``cast`` the text, then check ``ok``; the message says ``what`` was expected."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text.strip()}")
        return value

    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")
non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")


def percentile_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentile in (0, 100], got '{text}'") from None
    if not 0.0 < value <= 100.0:
        raise argparse.ArgumentTypeError(f"expected a percentile in (0, 100], got {text}")
    return value


def text_value(what: str) -> Callable[[str], str]:
    """An argparse type for a text that must say something (``--ray-address ''`` is not "run locally")."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"expected {what}, got an empty text (leave the option out instead)")
        return text.strip()

    return parse


def name_list(what: str, choices: tuple[str, ...] | None = None) -> Callable[[str], list[str]]:
    """An argparse type for comma-separated names: none empty (a stray comma is a typo), each one of ``choices``
    when given."""

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",")]
        if not any(items):
            raise argparse.ArgumentTypeError(f"expected {what}, got an empty text")
        if "" in items:
            raise argparse.ArgumentTypeError(f"an empty name in '{text}' (a stray comma?)")
        bad = [t for t in items if choices is not None and t.lower() not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} '{bad[0]}'; known: {', '.join(choices or ())}")
        return [t.lower() if choices is not None else t for t in items]

    return parse


def names(text: str | list[str] | None) -> list[str]:
    """A comma-separated list of names (layers, artifacts), blanks dropped (a list: as parsed by
    :func:`name_list`)."""
    if isinstance(text, list):
        return text
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
        "crops=center|10crop|12crop, centre=floor|round (odd crop margins: TensorFlow's floor or torchvision's round)",
    )
    g.add_argument(
        "--trust-savedmodel",
        action="store_true",
        help="allow a SavedModel folder as --model/--weights: loading one runs the operations of its graph, so "
        "use it only for files you trust",
    )


def preprocess(args: argparse.Namespace) -> dict[str, Any]:
    overrides = parse_preprocess_overrides(getattr(args, "preprocess", None))
    PreprocessSpec().with_overrides(**overrides)  # every value checked now, before any work
    return overrides


def data(
    p: argparse.ArgumentParser,
    required: bool = True,
    calib_default: int = 100,
    evaluation: bool = True,
    percentile: bool = True,
) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        required=required,
        help="KIND:PATH, e.g. imagenet:/data/imagenet/val" + ("" if evaluation else " (calibration data)"),
    )
    g.add_argument("--labels", help="ground-truth file for a flat image folder (found in the folder by default)")
    g.add_argument(
        "--allow-missing-images",
        action="store_true",
        help="evaluate the images present when the ground truth lists files the folder lacks (counted in the "
        "results as missing_images); by default that is an error",
    )
    if evaluation:
        g.add_argument("--limit", type=positive_int, help="evaluate only the first N images")
    g.add_argument(
        "--calib-images",
        type=positive_int,
        default=calib_default,
        help=f"calibration images{', disjoint from evaluation' if evaluation else ''} ({calib_default})",
    )
    g.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration draw")
    if percentile:
        calib_percentile(g)
    calibration_source(g, evaluation)
    g.add_argument(
        "--workers", type=positive_int, default=max(2, min(8, os.cpu_count() or 2)), help="image decoding threads"
    )
    input_cache(p)


def calib_percentile(g: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """``--calib-percentile``: every command that builds a calibrated target through :func:`calibration` needs it."""
    g.add_argument(
        "--calib-percentile",
        type=percentile_value,
        default=99.99,
        help="percentile of the percentile calibration method (qdq-int8-percentile), default 99.99",
    )


def calibration_source(g: argparse._ArgumentGroup, separate: bool = True) -> None:
    """``--calib-data`` (commands whose ``--data`` is evaluation data) and ``--calib-list``."""
    if separate:
        g.add_argument(
            "--calib-data",
            metavar="KIND:PATH",
            help="calibrate on this data instead of drawing from --data (then every image of --data is "
            "evaluated), e.g. images:/data/train-subset (a folder of unlabelled images, searched recursively)",
        )
    g.add_argument(
        "--calib-list",
        metavar="FILE",
        help="calibrate only on the files this list names, one file name (or relative path) per line, as "
        "MLPerf's cal_image_list_option_1.txt",
    )


def calibration(args: argparse.Namespace) -> CalibrationSpec:
    return CalibrationSpec(
        num_images=args.calib_images,
        seed=args.calib_seed,
        percentile=args.calib_percentile,
        data=getattr(args, "calib_data", None),
        list=getattr(args, "calib_list", None),
    )


def check_out_outside_data(out: str, sources: dict[str, str | None]) -> None:
    """Refuse an output folder that is, or is inside, a data folder (``--data``, ``--calib-data``, a plan's
    dataset): results, artifacts and logs would be written among the images (and read back as images).

    Args:
        out: The ``--out`` value.
        sources: Option (or plan key) -> its ``KIND:PATH`` value (None: not given).

    Raises:
        ConfigError: Naming ``--out``, the option and the folder.
    """
    target = Path(out).expanduser().resolve()
    for option, spec in sources.items():
        if not spec or not isinstance(spec, str):
            continue
        kind, sep, rest = spec.partition(":")
        folder = Path(rest if sep and kind.isalnum() and len(kind) > 1 else spec).expanduser().resolve()
        if not folder.is_dir():
            continue
        if target == folder or folder in target.parents:
            where = "is" if target == folder else "is inside"
            raise ConfigError(
                f"--out {out}: {where} the data folder of {option} ({folder}); results would be written among the "
                "images: give a folder outside it"
            )


def input_cache(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("preprocessed-input cache (each image decoded once, for every target and run)")
    g.add_argument(
        "--input-cache",
        metavar="DIR",
        help="cache folder (default: inputs/ under ~/.cache/quantship or $QUANTSHIP_CACHE)",
    )
    g.add_argument("--no-input-cache", action="store_true", help="decode every image on every pass")
    g.add_argument(
        "--input-cache-max-gb",
        type=positive_float,
        default=20.0,
        help="size cap; least recently used datasets are evicted beyond it, never one in use (20)",
    )


def input_cache_options(args: argparse.Namespace) -> InputCacheOptions | None:
    """The cache options of a command that declares them (None for one that does not)."""
    if not hasattr(args, "no_input_cache"):
        return None
    if args.input_cache and not args.no_input_cache:
        check_output_dir(args.input_cache, "--input-cache")
    return InputCacheOptions(enabled=not args.no_input_cache, path=args.input_cache, max_gb=args.input_cache_max_gb)


def providers(text: str) -> tuple[str, ...]:
    try:
        return check_ort_provider_names(text, "expected execution providers")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("expected execution providers: ")) from None


def post_training(p: argparse.ArgumentParser, auto: bool = True) -> None:
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
    g.add_argument(
        "--adaround",
        action="store_true",
        help="AdaRound: learn each int8 weight's rounding (up or down) so every layer's output on calibration "
        "images stays closest to the float model's; on the per-channel grid every backend uses",
    )
    defaults = AdaRoundOptions()
    g.add_argument(
        "--adaround-iterations",
        type=positive_int,
        metavar="N",
        help=f"with --adaround, optimisation steps per layer (default {defaults.iterations}; the paper: 10000)",
    )
    g.add_argument(
        "--adaround-images",
        type=positive_int,
        metavar="N",
        help=f"with --adaround, calibration images each layer is fitted on (default {defaults.images}; at most the "
        "calibration images there are)",
    )
    if auto:
        g.add_argument(
            "--post-training",
            choices=("auto",),
            help="auto: try none, bias correction, equalization, both and AdaRound for each target with int8 "
            "weights, score them on a held-out part of the calibration images (top-1 agreement and mean L1 "
            "against fp32) and keep the best; every candidate's score goes in the manifest",
        )


def ptq_steps(args: argparse.Namespace) -> PtqSteps:
    """The post-training steps of a command that declares them (none for one that does not).

    Raises:
        ConfigError: AdaRound budget options without --adaround, or --post-training auto with steps of its own.
    """
    if not hasattr(args, "equalize"):
        return PtqSteps()
    budget = {"iterations": args.adaround_iterations, "images": args.adaround_images}
    given = [f"--adaround-{k}" for k, v in budget.items() if v is not None]
    if given and not args.adaround:
        raise ConfigError(f"{', '.join(given)} set AdaRound's budget: add --adaround")
    adaround = AdaRoundOptions(**{k: v for k, v in budget.items() if v is not None}) if args.adaround else None
    if getattr(args, "post_training", None) == "auto":
        flags = (("--equalize", args.equalize), ("--bias-correct", args.bias_correct), ("--adaround", args.adaround))
        mixed = [f for f, on in flags if on]
        if mixed:
            raise ConfigError(f"--post-training auto chooses the steps itself: drop {', '.join(mixed)}")
        calib = getattr(args, "calib_images", None)
        if calib is not None and calib < AUTO_HOLD_OUT_EVERY * AUTO_MIN_HELD_OUT:
            raise ConfigError(
                f"--post-training auto scores its candidates on every {AUTO_HOLD_OUT_EVERY}th calibration image: "
                f"--calib-images must be at least {AUTO_HOLD_OUT_EVERY * AUTO_MIN_HELD_OUT}, got {calib}"
            )
        return PtqSteps(auto=True)
    return PtqSteps(equalize=args.equalize, bias_correct=args.bias_correct, relu6=args.relu6, adaround=adaround)


def convert_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The fields of :class:`quantship.jobs.convert.ConvertSpec` that ``convert`` and ``bench`` take from their
    options (all but model, targets, output folder and threads)."""
    return dict(
        weights=args.weights,
        data=args.data,
        labels=args.labels,
        calibration=calibration(args),
        preprocess_overrides=preprocess(args),
        workers=args.workers,
        trt=trt_options(args),
        allow_missing_images=args.allow_missing_images,
        trust_savedmodel=args.trust_savedmodel,
        ptq=ptq_steps(args),
    )


def runtime(p: argparse.ArgumentParser, batch: bool = True) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--threads", type=positive_int, help="CPU threads of LiteRT / ONNX Runtime")
    g.add_argument(
        "--ort-providers",
        type=providers,
        default=("cpu",),
        help="ONNX Runtime execution providers in priority order, e.g. CUDAExecutionProvider,CPUExecutionProvider "
        "(cpu, cuda, tensorrt accepted); one that is not available is an error, never a silent fallback",
    )
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


def check_output_file(option: str, value: str | None) -> None:
    """An output file option (``--qdq FILE``): its folder must be writable and the path must not be a folder.

    Raises:
        ConfigError: Naming the option and what to do.
    """
    if not value:
        return
    path = Path(value).expanduser()
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file name")
    check_output_dir(path.parent, option)


def _ssh_option(text: str) -> str:
    try:
        parse_ssh_option(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None
    return text


def remote(p: argparse.ArgumentParser) -> None:
    """``--remote URL`` and how to reach the device (bench, eval, convert)."""
    g = p.add_argument_group("remote device: measure where the model ships (see docs/devices.md)")
    g.add_argument(
        "--remote",
        metavar="URL",
        help="ssh://[user@]host[:port]: run the artifacts on that device (it needs Python >= 3.10, numpy and the "
        "artifact's runtime; nothing is installed there)",
    )
    g.add_argument("--remote-python", metavar="PATH", default="python3", help="the interpreter on the device (python3)")
    g.add_argument("--ssh-key", metavar="FILE", help="private key for ssh -i (default: ssh's own: agent, config)")
    g.add_argument(
        "--ssh-option",
        metavar="K=V",
        action="append",
        default=[],
        type=_ssh_option,
        help="passed to ssh as -o K=V (repeatable), e.g. StrictHostKeyChecking=accept-new, ProxyJump=gateway",
    )
    g.add_argument(
        "--remote-no-cache",
        action="store_true",
        help="do not keep artifacts on the device between runs (they are kept under their SHA-256 by default)",
    )
    g.add_argument(
        "--remote-timeout",
        metavar="SECONDS",
        help="the deadline of each request to the device runner, replacing the defaults by request (engine build "
        "60 min, model load 10 min, one inference 2 min, a bench round 2 min, each plus its per-query allowance); "
        "past it the runner is stopped and the run ends with one line",
    )


def remote_options(args: argparse.Namespace) -> RemoteOptions | None:
    """The device of a command with ``--remote`` (None without it).

    Raises:
        ConfigError: A remote option without ``--remote``, or a bad value.
    """
    if not hasattr(args, "remote"):
        return None
    if args.remote is None:
        given = [
            name
            for name, on in (
                ("--remote-python", args.remote_python != "python3"),
                ("--ssh-key", args.ssh_key is not None),
                ("--ssh-option", bool(args.ssh_option)),
                ("--remote-no-cache", args.remote_no_cache),
                ("--remote-timeout", args.remote_timeout is not None),
            )
            if on
        ]
        if given:
            raise ConfigError(f"{', '.join(given)} go(es) with --remote URL")
        return None
    return RemoteOptions(
        url=args.remote,
        python=args.remote_python,
        ssh_key=args.ssh_key,
        ssh_options=tuple(args.ssh_option),
        cache=not args.remote_no_cache,
        timeout=args.remote_timeout,
    )
