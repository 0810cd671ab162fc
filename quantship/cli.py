"""The ``quantship`` command: subcommands built from shared argument groups.

Only this module turns :class:`QuantshipError` into a message and an exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from quantship import __version__
from quantship.errors import ConfigError, QuantshipError

log = logging.getLogger("quantship")
_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def deco(fn):
        _COMMANDS[name] = fn
        return fn

    return deco


# ------------------------------------------------------------------------------- argument groups


def _names(text: str | None) -> list[str]:
    """A comma-separated list of names (targets, layers), blanks dropped."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _parse_overrides(text: str | None) -> dict[str, Any]:
    """``mode=tf,size=224,crop_pct=0.875,interpolation=bicubic,layout=nchw,crops=10crop`` -> dict."""
    if not text:
        return {}
    out: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--preprocess expects key=value pairs separated by commas, got '{item}'")
        if key == "size":
            parts = value.lower().replace("x", " ").split()
            try:
                nums = [int(p) for p in parts]
            except ValueError:
                raise ConfigError(f"--preprocess size must be N or HxW, got '{value}'") from None
            out["size"] = (nums[0], nums[-1])
        elif key in ("crop_pct",):
            try:
                out[key] = float(value)
            except ValueError:
                raise ConfigError(f"--preprocess {key} must be a number, got '{value}'") from None
        elif key in ("mean", "std"):
            try:
                vals = [float(v) for v in value.split("/")]
            except ValueError:
                raise ConfigError(f"--preprocess {key} expects three numbers separated by '/', got '{value}'") from None
            out[key] = tuple(vals * 3 if len(vals) == 1 else vals)
        else:
            out[key] = value
    return out


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="registry name (see 'quantship models') or a model file")
    g.add_argument("--weights", help="weights file (.keras, .weights.h5, .h5, SavedModel dir), 'pretrained' or 'random'")
    g.add_argument(
        "--preprocess",
        help="preprocessing overrides: mode=caffe|tf|torch|raw, size=224, crop_pct=0.875, "
        "interpolation=bilinear|bicubic|area, mean=a/b/c, std=a/b/c, channel_order=rgb|bgr, layout=nhwc|nchw, "
        "crops=center|10crop|12crop",
    )


def _data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required, help="KIND:PATH, e.g. imagenet:/data/imagenet/val")
    g.add_argument("--labels", help="ground-truth file for a flat image folder (found in the folder by default)")
    g.add_argument("--limit", type=int, help="evaluate only the first N images")
    g.add_argument("--calib-images", type=int, default=100, help="calibration images, disjoint from evaluation (100)")
    g.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration draw")
    g.add_argument("--workers", type=int, default=max(2, min(8, os.cpu_count() or 2)), help="image decoding threads")


def _runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--threads", type=int, help="CPU threads of LiteRT / ONNX Runtime")
    g.add_argument("--batch-size", type=int, default=8)


def _trt_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TensorRT (trt-* targets; needs TensorRT and an NVIDIA GPU)")
    g.add_argument("--trt-batch", default="1:8:32", help="batch optimization profile MIN:OPT:MAX, or N for a fixed batch")
    g.add_argument("--trt-workspace-mb", type=int, default=2048, help="builder workspace limit in MiB")
    g.add_argument("--trt-timing-cache", help="timing cache file (loaded if present, saved after the build)")
    g.add_argument("--trt-calib-cache", help="TensorRT 10 calibration cache: reused if present (e.g. from 'quantship calibrate --cache'), written otherwise")
    g.add_argument("--trt-qdq-method", default="entropy", help="calibration of the Q/DQ model behind trt-int8-qdq (default entropy)")
    g.add_argument("--trt-cuda-graph", action="store_true", help="run engines through captured CUDA graphs")


def _trt_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "trt_batch": args.trt_batch,
        "trt_workspace_mb": args.trt_workspace_mb,
        "trt_timing_cache": args.trt_timing_cache,
        "trt_calibration_cache": args.trt_calib_cache,
        "trt_qdq_method": args.trt_qdq_method,
        "trt_cuda_graph": args.trt_cuda_graph,
        "anchors": getattr(args, "anchors", None),
    }


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


# ------------------------------------------------------------------------------------- commands


@command("models")
def _cmd_models(args: argparse.Namespace) -> int:
    from quantship.models.stats import model_table

    print(model_table(with_stats=not args.no_stats))
    return 0


@command("targets")
def _cmd_targets(args: argparse.Namespace) -> int:
    from quantship.targets import list_targets

    for t in list_targets():
        print(f"{t.name:24s} {t.spec.description}")
    return 0


@command("eval")
def _cmd_eval(args: argparse.Namespace) -> int:
    from quantship.config import CalibrationSpec, EvalSpec
    from quantship.evaluate.results import text_table
    from quantship.pipeline import run_eval

    if args.task:
        kind = args.data.split(":", 1)[0]
        if (kind in ("voc2007", "coco")) != (args.task == "detection"):
            raise ConfigError(f"--task {args.task} does not fit --data {kind}:... (voc2007 and coco are detection, imagenet is classification)")
    spec = EvalSpec(
        model=args.model,
        data=args.data,
        targets=_names(args.targets),
        out_dir=Path(args.out),
        weights=args.weights,
        labels=args.labels,
        limit=args.limit,
        batch_size=args.batch_size,
        threads=args.threads,
        workers=args.workers,
        calibration=CalibrationSpec(num_images=args.calib_images, seed=args.calib_seed),
        preprocess_overrides=_parse_overrides(args.preprocess),
        options=_trt_options(args),
    )
    print(f"quantship eval: {spec.model} on {spec.data} -> {spec.out_dir} (converter log: {spec.out_dir / 'convert.log'})")
    rows = run_eval(spec)
    print()
    if rows and rows[0].get("task") == "detection":
        from quantship.pipeline import DETECTION_COLUMNS

        print(text_table(rows, DETECTION_COLUMNS))
    else:
        print(text_table(rows))
    skipped = rows[0]["skipped"] if rows else 0
    print(f"\n{rows[0]['images']} images, {rows[0].get('calibration_images', 0)} calibration images" + (f", {skipped} unreadable skipped (skipped.txt)" if skipped else ""))
    print(f"results: {spec.out_dir / 'results.jsonl'}, {spec.out_dir / 'results.md'}")
    return 0


@command("convert")
def _cmd_convert(args: argparse.Namespace) -> int:
    from quantship.pipeline import run_convert

    if args.auto_fallback:
        return _auto_fallback(args)
    artifacts = run_convert(
        model=args.model,
        weights=args.weights,
        targets=_names(args.targets),
        out_dir=Path(args.out),
        data=args.data,
        labels=args.labels,
        calib_images=args.calib_images,
        calib_seed=args.calib_seed,
        preprocess_overrides=_parse_overrides(args.preprocess),
        workers=args.workers,
        options=_trt_options(args),
    )
    for name, art in artifacts.items():
        if art is not None:
            print(f"{name:22s} {art.path}  ({art.manifest['size_bytes'] / 1e6:.2f} MB, manifest {art.manifest_path.name})")
    return 0


@command("calibrate")
def _cmd_calibrate(args: argparse.Namespace) -> int:
    from quantship.pipeline import run_calibrate

    out = run_calibrate(
        model=args.model,
        weights=args.weights,
        data=args.data,
        labels=args.labels,
        method=args.method,
        percentile=args.percentile,
        cache=args.cache,
        qdq=args.qdq,
        ranges=args.ranges,
        exclude=_names(args.exclude),
        calib_images=args.calib_images,
        calib_seed=args.calib_seed,
        preprocess_overrides=_parse_overrides(args.preprocess),
        workers=args.workers,
        threads=args.threads,
        trt_version=args.trt_version,
        log_path=Path(args.out) / "convert.log",
    )
    print(f"{args.method} calibration on {out['images']} images: ranges for {out['tensors']} of {out['observed']} observed tensors "
          f"(histograms: {out['histogram_bytes'] / 1e6:.1f} MB); float model: {out['onnx']}")
    for what, path in (("TensorRT calibration cache", args.cache), ("Q/DQ ONNX model", args.qdq), ("ranges JSON", args.ranges)):
        if path:
            print(f"  {what}: {path}")
    for line in out["report"]:
        print(f"  Q/DQ: {line}")
    return 0


@command("bench")
def _cmd_bench(args: argparse.Namespace) -> int:
    from quantship.evaluate.bench import BenchConfig, bench, display_fields, mobile_profile
    from quantship.evaluate.results import text_table
    from quantship.fileio import write_json_atomic, write_text_atomic

    artifacts: list[tuple[str, str]] = [(Path(a).stem, a) for a in (args.artifact or [])]
    if args.model:
        from quantship.pipeline import run_convert

        built = run_convert(
            model=args.model, weights=args.weights, targets=_names(args.targets),
            out_dir=Path(args.out), data=args.data, labels=args.labels, calib_images=args.calib_images,
            calib_seed=args.calib_seed, preprocess_overrides=_parse_overrides(args.preprocess), workers=args.workers,
            options=_trt_options(args),
        )
        artifacts += [(name, str(a.path)) for name, a in built.items() if a is not None]
    if not artifacts:
        raise ConfigError("nothing to benchmark: give --artifact FILE (repeatable) or --model with --targets")
    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        raise ConfigError(f"--batch-sizes must be integers separated by commas, got '{args.batch_sizes}'") from None
    common = dict(warmup_seconds=args.warmup, min_queries=args.min_queries, min_seconds=args.min_seconds, batch_sizes=batch_sizes, cuda_graph=args.trt_cuda_graph)
    configs = []
    for name, path in artifacts:
        if args.mobile and path.endswith(".tflite"):
            configs += mobile_profile(path, name, **common)
        else:
            configs.append(BenchConfig(path, target=name, threads=args.threads, **common))
    print(f"benchmarking {len(configs)} configuration(s): warm-up {args.warmup:g} s, then >= {args.min_queries} queries and >= {args.min_seconds:g} s each")
    rows = bench(configs)
    for r in rows:
        r["model"] = args.model or ""
    out = Path(args.out)
    from quantship.evaluate.environment import environment
    from quantship.evaluate.report import BENCH_COLUMNS

    write_text_atomic(out / "bench.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    write_json_atomic(out / "environment.json", environment())
    for r in rows:
        display_fields(r)
    print(text_table(rows, BENCH_COLUMNS))
    for r in rows:
        for w in r.get("warnings", []):
            print(f"warning: {r['target']}: {w}")
        if r.get("compute_ms_mean") is not None:
            print(f"{r['target']}: H2D {r['h2d_ms_mean']:.3f} ms, compute {r['compute_ms_mean']:.3f} ms, D2H {r['d2h_ms_mean']:.3f} ms")
    print(f"results: {out / 'bench.jsonl'}")
    return 0


@command("signoff")
def _cmd_signoff(args: argparse.Namespace) -> int:
    from quantship.config import SignoffPlan
    from quantship.evaluate.report import VERDICT_COLUMNS, build_report, load_results
    from quantship.evaluate.results import text_table
    from quantship.evaluate.signoff import run_signoff

    plan = SignoffPlan.load(args.plan)
    out = Path(args.out or f"runs/{plan.name}")
    print(f"quantship signoff: {len(plan.models)} model(s) x {len(plan.targets)} target(s) on {plan.data} -> {out} (resumable: run again to continue)")
    rows, verdicts = run_signoff(plan, out)
    md, page = build_report(out, f"sign-off: {plan.name}")
    shown = load_results(out)["verdicts"]
    print(text_table(shown, VERDICT_COLUMNS))
    failed = [v for v in verdicts if not v["passed"]]
    print(f"\n{'FAIL' if failed else 'PASS'}: {len(verdicts) - len(failed)} of {len(verdicts)} gates passed. Report: {page}, {md}")
    return 1 if failed else 0


@command("report")
def _cmd_report(args: argparse.Namespace) -> int:
    from quantship.evaluate.report import build_report

    md, page = build_report(Path(args.results))
    print(f"report: {page}, {md}")
    return 0


@command("sensitivity")
def _cmd_sensitivity(args: argparse.Namespace) -> int:
    from quantship.evaluate.report import build_report
    from quantship.evaluate.results import text_table
    from quantship.fileio import write_text_atomic
    from quantship import sensitivity as sens

    out = Path(args.out)
    backends = [b for b in args.backend.split(",") if b]
    gate = sens.parse_gate(args.gate) if args.gate else None
    kinds = [k for k in (args.weight_study or "").split(",") if k]
    recipe = dict(item.split("=", 1) for item in args.recipe.split(",")) if args.recipe else None
    setup = sens.prepare(args.model, args.weights, args.data, args.labels, args.images, args.calib_images, out,
                         _parse_overrides(args.preprocess), threads=args.threads, workers=args.workers)
    try:
        rows = sens.run_analyses(
            setup, backends, method=args.method, cumulative=args.cumulative, depthwise=args.depthwise, weight_kinds=kinds,
            per_layer=args.per_layer, recipe=recipe, gate=gate, threads=args.threads, print_fn=print,
        )
    finally:
        setup.close()
    write_text_atomic(out / "sensitivity.jsonl", "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows))
    single = [r for r in rows if r["kind"] == "single"]
    cols = (("backend", "backend", "{}"), ("rank", "rank", "{}"), ("layer", "layer", "{}"), ("top1", "top-1", "{:.4f}"),
            ("delta_top1", "Δ top-1", "{:+.4f}"), ("agreement_top1", "agree", "{:.4f}"), ("sqnr_db", "SQNR dB", "{:.1f}"))
    print(text_table(single[: 2 * args.show], cols))
    for r in rows:
        if r["kind"] == "fallback_cost":
            print(f"{r['backend']:7s} {r['variant']:14s} top-1 {r['top1']:.4f}  agree {r['agreement_top1']:.4f}  {r['size_mb']:.2f} MB  p50 {r['latency_ms_p50']:.2f} ms")
    md, page = build_report(out, f"sensitivity: {setup.loaded.name}")
    print(f"results: {out / 'sensitivity.jsonl'}; report: {page}, {md}")
    return 0


def _auto_fallback(args: argparse.Namespace) -> int:
    """``convert --auto-fallback``: the smallest float set (greedy by sensitivity) for the gate, applied to
    TFLite int8 and the Q/DQ ONNX."""
    from quantship import sensitivity as sens
    from quantship.fileio import write_text_atomic

    if not args.gate or not args.data:
        raise ConfigError("--auto-fallback needs --gate (e.g. 'top1>=0.99') and --data (calibration and held-out images)")
    gate = sens.parse_gate(args.gate)
    out = Path(args.out)
    setup = sens.prepare(args.model, args.weights, args.data, args.labels, args.fallback_images, args.calib_images, out,
                         _parse_overrides(args.preprocess), threads=None, workers=args.workers)
    try:
        rows = sens.run_analyses(setup, ["qdq", "tflite"], method=args.fallback_method, gate=gate, print_fn=print)
    finally:
        setup.close()
    write_text_atomic(out / "fallback.jsonl", "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows))
    for r in rows:
        if r["kind"] == "fallback_cost":
            print(f"{r['artifact']}: top-1 {r['top1']:.4f}, agreement {r['agreement_top1']:.4f}, {r['size_mb']:.2f} MB, p50 {r['latency_ms_p50']:.2f} ms")
    passed = any(r["kind"] == "fallback" and r["passed"] and r["backend"] == "tflite" for r in rows)
    return 0 if passed else 1


@command("demo")
def _cmd_demo(args: argparse.Namespace) -> int:
    from quantship.demo import run_demo

    return run_demo(Path(args.out), threads=args.threads, print_fn=print)


# ----------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from quantship.targets import DEFAULT_TARGETS

    parser = argparse.ArgumentParser(
        prog="quantship",
        description="Export Keras models to TFLite / ONNX / TensorRT, evaluate every runtime on the same data, sign off.",
    )
    parser.add_argument("--version", action="version", version=f"quantship {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered architectures")
    p.add_argument("--no-stats", action="store_true", help="skip building models to count parameters and MACs")
    _common(p)

    p = sub.add_parser("targets", help="list evaluation targets")
    _common(p)

    p = sub.add_parser("eval", help="evaluate targets on a dataset, side by side")
    _model_args(p)
    _data_args(p)
    _runtime_args(p)
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated targets (see 'quantship targets')")
    p.add_argument("--out", default="quantship-out", help="output folder (artifacts, results.jsonl, results.md)")
    p.add_argument("--task", choices=("classification", "detection"), help="checked against the dataset's task (voc2007:/coco: are detection)")
    p.add_argument("--anchors", help="anchor configuration (JSON) of a detection model given as a file")
    _trt_args(p)
    _common(p)

    p = sub.add_parser("convert", help="write the artifacts of the given targets (with manifests)")
    _model_args(p)
    _data_args(p, required=False)
    p.add_argument("--targets", default="tflite-fp32,tflite-fp16,tflite-dynamic,tflite-int8,tflite-int16x8")
    p.add_argument("--out", default="quantship-out", help="output folder")
    p.add_argument("--auto-fallback", action="store_true", help="int8 TFLite + Q/DQ ONNX with the fewest float layers that pass --gate")
    p.add_argument("--gate", help="with --auto-fallback: e.g. 'top1>=0.99' (relative to fp32) or 'drop<=0.5' (points)")
    p.add_argument("--fallback-images", type=int, default=200, help="held-out images for ranking and verifying the fallback")
    p.add_argument("--fallback-method", default="max", help="calibration of the Q/DQ model (max)")
    _trt_args(p)
    _common(p)

    p = sub.add_parser("calibrate", help="calibrate once; write a TensorRT cache, a Q/DQ ONNX model and/or ranges JSON")
    _model_args(p)
    _data_args(p)
    p.add_argument("--method", default="entropy", help="max | entropy | percentile | mse (default entropy)")
    p.add_argument("--percentile", type=float, help="percentile for --method percentile (default 99.99)")
    p.add_argument("--cache", help="write a TensorRT calibration cache here")
    p.add_argument("--qdq", help="write the Q/DQ ONNX model (TensorRT explicit quantization) here")
    p.add_argument("--ranges", help="write the per-tensor ranges as JSON here")
    p.add_argument("--exclude", help="comma-separated node or Keras layer names to keep in float in the Q/DQ model")
    p.add_argument("--trt-version", help="version field of the cache header (default that of TensorRT 10)")
    p.add_argument("--threads", type=int, help="ONNX Runtime / histogram threads")
    p.add_argument("--out", default="quantship-out", help="folder for logs")
    _common(p)

    p = sub.add_parser("bench", help="latency: percentiles, throughput, init time, peak memory (each config in its own process)")
    p.add_argument("--artifact", action="append", help="a .tflite / .onnx / .engine file (repeatable)")
    p.add_argument("--model", help="build these targets' artifacts first (registry name or model file)")
    p.add_argument("--weights")
    p.add_argument("--preprocess")
    p.add_argument("--targets", default="tflite-fp32,tflite-fp16,tflite-int8")
    p.add_argument("--data", help="calibration data for int8 targets (KIND:PATH)")
    p.add_argument("--labels")
    p.add_argument("--calib-images", type=int, default=100)
    p.add_argument("--calib-seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--threads", type=int, help="CPU threads (LiteRT / ONNX Runtime)")
    p.add_argument("--mobile", action="store_true", help="mobile-class CPU profile: LiteRT on 1, 2 and 4 threads pinned to fixed cores")
    p.add_argument("--batch-sizes", default="1", help="comma-separated; batch 1 gives the latency percentiles, each gives a throughput")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds (1)")
    p.add_argument("--min-queries", type=int, default=200, help="at least this many timed queries (200)")
    p.add_argument("--min-seconds", type=float, default=5.0, help="and at least this many seconds (5)")
    p.add_argument("--out", default="quantship-bench")
    _trt_args(p)
    _common(p)

    p = sub.add_parser("signoff", help="run a sign-off plan (YAML): matrix, gates with bootstrap intervals, report; exit 1 if a gate fails")
    p.add_argument("plan", help="plan file (YAML)")
    p.add_argument("--out", help="results folder (default runs/<plan name>)")
    _common(p)

    p = sub.add_parser("report", help="rebuild report.md and report.html from a results folder")
    p.add_argument("results", help="folder with results.jsonl / signoff.jsonl / bench.jsonl")
    _common(p)

    p = sub.add_parser("sensitivity", help="per-layer quantization sensitivity, weight-precision studies, float fallback for a gate")
    _model_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="KIND:PATH")
    g.add_argument("--labels")
    g.add_argument("--images", type=int, default=200, help="held-out images (200)")
    g.add_argument("--calib-images", type=int, default=100)
    g.add_argument("--workers", type=int, default=4)
    p.add_argument("--backend", default="qdq,tflite", help="qdq (Q/DQ ONNX on ONNX Runtime) and/or tflite (full int8)")
    p.add_argument("--method", default="max", help="calibration of the Q/DQ model (max)")
    p.add_argument("--cumulative", action="store_true", help="also quantize layers 0..k in order, row by row")
    p.add_argument("--depthwise", action="store_true", help="also compare pointwise/dense-only vs all layers quantized")
    p.add_argument("--weight-study", help="weight precisions: fp16,int8-tensor,int8-channel,mantissa:K")
    p.add_argument("--per-layer", action="store_true", help="weight study per layer too (not only all layers at once)")
    p.add_argument("--recipe", help="mixed weight recipe: layer=kind,layer=kind")
    p.add_argument("--gate", help="find float layers so int8 passes, e.g. 'top1>=0.99' or 'drop<=0.5'")
    p.add_argument("--threads", type=int)
    p.add_argument("--show", type=int, default=10, help="rows shown per backend")
    p.add_argument("--out", default="quantship-sensitivity")
    _common(p)

    p = sub.add_parser("demo", help="pretrained EfficientNet-Lite0 on sample photos: every TFLite precision, ONNX and Q/DQ int8")
    p.add_argument("--out", default="quantship-demo", help="output folder")
    p.add_argument("--threads", type=int, default=2)
    _common(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from quantship import progress
    from quantship.fileio import cache_dir
    from quantship.logs import route_native_stderr

    progress.set_enabled(not args.quiet and sys.stderr.isatty())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not args.verbose:
        out = getattr(args, "out", None)
        route_native_stderr(Path(out) / "native.log" if out else cache_dir() / "native.log")
    try:
        return _COMMANDS[args.command](args)
    except QuantshipError as exc:
        print(f"quantship {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"quantship {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
