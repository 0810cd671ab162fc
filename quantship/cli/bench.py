"""``quantship bench``: latency percentiles, throughput, init time, peak memory (each config in its own process,
several configurations interleaved round by round with ratios to a reference), under MLPerf LoadGen on request,
and forward/backward times of a Keras model."""

from __future__ import annotations

import argparse
from pathlib import Path

from quantship.cli import args as a
from quantship.cli.registry import Command
from quantship.errors import ConfigError
from quantship.jobs.bench import BenchSpec, run_bench
from quantship.jobs.convert import ConvertSpec

SCENARIOS = ("singlestream", "multistream", "offline")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", action="append", default=[], help="a .tflite / .onnx / .engine file (repeatable)")
    a.model(p, required=False)
    a.data(p, required=False, evaluation=False)
    p.add_argument(
        "--targets",
        help="comma-separated targets to build from --model and time (see 'quantship targets'; default "
        "tflite-fp32,tflite-fp16,tflite-int8, none with --forward-backward)",
    )
    a.runtime(p, batch=False)
    p.add_argument(
        "--mobile",
        action="store_true",
        help="mobile-class CPU profile: LiteRT on 1, 2 and 4 threads pinned to fixed cores",
    )
    p.add_argument(
        "--batch-sizes",
        default="1",
        help="comma-separated; batch 1 gives the latency percentiles, each gives a throughput (LoadGen Offline "
        "runs the largest)",
    )
    p.add_argument("--warmup", type=a.non_negative_float, default=1.0, help="warm-up seconds (1)")
    p.add_argument(
        "--min-queries",
        type=a.positive_int,
        help="at least this many timed queries (200; under --loadgen: MLPerf's minimum, and a lower value makes "
        "the run valid only under reduced settings)",
    )
    p.add_argument(
        "--min-seconds",
        type=a.non_negative_float,
        help="and at least this many seconds (5; under --loadgen: MLPerf's 600 s, lower values as above)",
    )
    p.add_argument(
        "--raw-inputs",
        action="store_true",
        help="preload samples in the model's own input types (int8 models: quantized once, as an MLPerf QSL holds "
        "them) and time the runner without its (de)quantization",
    )
    g = p.add_argument_group(
        "interleaved timing (several configurations: same rounds, order rotated, ratios to a reference with a 95 % "
        "interval)"
    )
    g.add_argument(
        "--reference",
        metavar="TARGET|FILE",
        help="what every ratio is taken to (default: the first fp32 configuration of the same runtime, else the first "
        "one; ratios only within the same batch, threads and cores)",
    )
    g.add_argument(
        "--ratio-precision",
        type=float,
        default=0.03,
        metavar="P",
        help="add rounds until every ratio's 95 %% interval is within +-P (a fraction: 0.03 is +-3 %%, the default)",
    )
    g.add_argument(
        "--min-rounds",
        type=int,
        default=10,
        help="at least this many rounds unless --max-seconds ends the run first (10; at least 2)",
    )
    g.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="stop adding rounds after this many seconds even if the precision or a minimum is not reached (60)",
    )
    g.add_argument(
        "--queries-per-round", type=a.positive_int, default=20, help="queries per configuration per round (20)"
    )
    g = p.add_argument_group("MLPerf LoadGen (pip install 'quantship[loadgen]')")
    g.add_argument(
        "--loadgen",
        metavar="SCENARIO",
        type=a.name_list("LoadGen scenario"),
        help=f"time under MLPerf LoadGen instead: {'|'.join(SCENARIOS)} (comma-separated for several); its logs "
        "go to OUT/loadgen/",
    )
    g = p.add_argument_group("training-side timing (Keras classification models)")
    g.add_argument(
        "--forward-backward",
        action="store_true",
        help="time --model's forward and forward+backward passes (cross-entropy, batch norm in training mode) at "
        "each --batch-sizes",
    )
    g.add_argument("--per-layer", action="store_true", help="with --forward-backward: the ten slowest layers' forward")
    a.out(p, "quantship-bench")
    a.remote(p)
    a.trt(p)
    a.common(p)


def run(args: argparse.Namespace) -> int:
    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        raise ConfigError(f"--batch-sizes must be integers separated by commas, got '{args.batch_sizes}'") from None
    if min(batch_sizes) <= 0:
        raise ConfigError(f"--batch-sizes must be positive, got '{args.batch_sizes}'")
    if args.reference is not None and not args.reference.strip():
        raise ConfigError("--reference is empty: name a target or an artifact file that is benched")
    targets = args.targets
    if targets is None and args.model and not args.forward_backward:
        targets = "tflite-fp32,tflite-fp16,tflite-int8"
    convert = None
    if args.model:
        convert = ConvertSpec(args.model, targets or (), Path(args.out), threads=args.threads, **a.convert_kwargs(args))
    spec = BenchSpec(
        Path(args.out),
        args.artifact,
        convert=convert,
        threads=args.threads,
        mobile=args.mobile,
        batch_sizes=batch_sizes,
        warmup_seconds=args.warmup,
        min_queries=args.min_queries,
        min_seconds=args.min_seconds,
        cuda_graph=args.trt_cuda_graph,
        loadgen=a.names(args.loadgen),
        raw_inputs=args.raw_inputs,
        forward_backward=args.forward_backward,
        per_layer=args.per_layer,
        providers=args.ort_providers,
        reference=args.reference,
        ratio_precision=args.ratio_precision,
        min_rounds=args.min_rounds,
        max_seconds=args.max_seconds,
        queries_per_round=args.queries_per_round,
        remote=a.remote_options(args),
    )
    result = run_bench(spec)
    print(result.text)
    return result.exit_code


COMMAND = Command(
    "bench",
    "latency: percentiles, throughput, init time, peak memory (each config in its own process); MLPerf LoadGen; "
    "forward/backward times",
    add_arguments,
    run,
)
