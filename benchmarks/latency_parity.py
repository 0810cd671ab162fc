"""Does `quantship bench` give the latency MLPerf LoadGen and a bare runtime loop give on the same file?

For EfficientNet-Lite0 tflite-fp32, tflite-int8 and onnx-fp32 (built from the pretrained weights, calibrated on
the demo photos) or the files given with --artifact, each repeat runs, each in its own process and in rotating
order:

* bench:   `quantship bench` (warm-up, then >= --min-queries queries and >= --min-seconds over 64 preloaded
           samples), its p50 / p90 of the whole `Runner.infer` call and of the runtime call inside it;
* loadgen: `quantship bench --loadgen singlestream` with the same minimums (same runner call, same samples);
* bare:    a loop without quantship: `set_tensor` + `invoke()` + `get_tensor` (LiteRT) or `session.run` (ONNX
           Runtime) on the same samples held in the model's own input type, timed as a whole and (LiteRT)
           `invoke()` alone.

Every repeat is printed, then the medians. Targets (issue 17): bench vs LoadGen within 3 % at p50 and p90; bench
vs bare loop within 3 % at p50. A model with integer inputs is run twice more: with float samples the runner
quantizes each query (what an application feeding floats pays; the bare loop does not), with --raw-inputs it
gets int8 samples as an MLPerf QSL holds them (what the bare loop does).

    python benchmarks/latency_parity.py [--repeats 5] [--threads 2] [--min-queries 1024] [--min-seconds 10]
    python benchmarks/latency_parity.py --artifact a.tflite --artifact b.onnx --repeats 5
    python benchmarks/latency_parity.py --smoke     # tiny random model, 1 repeat of a few queries: seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))
TARGETS = ("tflite-fp32", "tflite-int8", "onnx-fp32")
SAMPLES = 64


def _samples(shape, dtype, scale, zero_point) -> list[np.ndarray]:
    # The sample set quantship's bench preloads (uniform in [-1, 1], seed 0), in the model's own input type.
    x = np.random.default_rng(0).uniform(-1, 1, (SAMPLES, *shape)).astype(np.float32)
    if scale:
        info = np.iinfo(dtype)
        x = np.clip(np.round(x / scale) + zero_point, info.min, info.max)
    x = x.astype(dtype)
    return [x[i : i + 1] for i in range(SAMPLES)]


def bare_loop(path: str, threads: int, min_queries: int, min_seconds: float, warmup: float) -> dict:
    """The loop an application writes without quantship, on preloaded samples of the model's input type."""
    call, invoke = [], []
    if path.endswith(".tflite"):
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_path=path, num_threads=threads)
        it.allocate_tensors()
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        scale, zp = inp["quantization"]
        feeds = _samples(inp["shape"][1:], inp["dtype"], scale, zp)

        def run(x):
            t0 = time.perf_counter()
            it.set_tensor(inp["index"], x)
            t1 = time.perf_counter()
            it.invoke()
            t2 = time.perf_counter()
            it.get_tensor(out["index"])
            t3 = time.perf_counter()
            return t3 - t0, t2 - t1
    else:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        i = sess.get_inputs()[0]
        feeds = _samples([d if isinstance(d, int) else 1 for d in i.shape[1:]], np.float32, 0, 0)

        def run(x):
            t0 = time.perf_counter()
            sess.run(None, {i.name: x})
            t = time.perf_counter() - t0
            return t, t

    end = time.perf_counter() + warmup
    n = 0
    while n < 5 or time.perf_counter() < end:
        run(feeds[n % SAMPLES])
        n += 1
    start = time.perf_counter()
    while len(call) < min_queries or time.perf_counter() - start < min_seconds:
        c, v = run(feeds[len(call) % SAMPLES])
        call.append(c * 1e3)
        invoke.append(v * 1e3)
    return {
        "latency_ms_p50": float(np.percentile(call, 50)),
        "latency_ms_p90": float(np.percentile(call, 90)),
        "runtime_ms_p50": float(np.percentile(invoke, 50)),
        "runtime_ms_p90": float(np.percentile(invoke, 90)),
        "iterations": len(call),
    }


def build(work: Path, threads: int, smoke: bool = False) -> dict[str, str]:
    """EfficientNet-Lite0's artifacts calibrated on the demo photos (smoke: the tiny model's, on 4 of them)."""
    from smoke import demo_artifacts  # benchmarks/smoke.py, beside this file

    return demo_artifacts(work, ",".join(TARGETS), threads, smoke)


def has_integer_input(path: str) -> bool:
    if not path.endswith(".tflite"):
        return False
    from ai_edge_litert.interpreter import Interpreter

    d = Interpreter(model_path=path).get_input_details()[0]
    return np.dtype(d["dtype"]).kind in "iu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--artifact", action="append", default=[], help="files to compare (default: build EfficientNet-Lite0)"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-queries", type=int, default=1024)
    p.add_argument("--min-seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--work", help="folder for the built files and LoadGen's logs (default: a temporary one)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 1 repeat of 5 queries (seconds)")
    p.add_argument("--_bare", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke and not args._bare:
        args.repeats, args.min_queries, args.min_seconds, args.warmup = 1, 5, 0.0, 0.0
    if args._bare:  # worker: the bare loop in a fresh process
        print(json.dumps(bare_loop(args._bare, args.threads, args.min_queries, args.min_seconds, args.warmup)))
        return

    from quantship.evaluate.bench import BenchConfig, bench
    from quantship.evaluate.environment import cpu_model

    t_start = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="quantship-parity-"))
    files = {Path(a).stem: a for a in args.artifact} or build(work, args.threads, args.smoke)
    print(
        f"CPU {cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; {args.threads} threads, "
        f"batch 1, >= {args.min_queries} queries and >= {args.min_seconds:g} s per run, {args.repeats} repeats"
    )

    def run_bench(path, name, raw, loadgen):
        cfg = BenchConfig(
            path,
            name,
            threads=args.threads,
            warmup_seconds=args.warmup,
            min_queries=args.min_queries,
            min_seconds=args.min_seconds,
            raw_inputs=raw,
            loadgen="singlestream" if loadgen else None,
            loadgen_dir=str(work / "loadgen" / f"{name}-{'raw' if raw else 'float'}-{time.time_ns()}"),
        )
        (row,) = bench([cfg])
        if loadgen and not row["loadgen_valid"]:
            print(f"    LoadGen: {row['validity']}")
        return row

    def run_bare(path):
        out = subprocess.run(
            [sys.executable, __file__, "--_bare", path, "--threads", str(args.threads), "--min-queries",
             str(args.min_queries), "--min-seconds", str(args.min_seconds), "--warmup", str(args.warmup)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    summary = []
    for name, path in files.items():
        modes = [False, True] if has_integer_input(path) else [False]
        for raw in modes:
            label = f"{name}{' (raw int8 samples)' if raw else ''}"
            print(f"\n{label}: p50 / p90 ms per repeat")
            runs = {
                "bench": lambda: run_bench(path, name, raw, False),
                "loadgen": lambda: run_bench(path, name, raw, True),
                "bare": lambda: run_bare(path),
            }
            got: dict[str, list[dict]] = {k: [] for k in runs}
            order = list(runs)
            for r in range(args.repeats):
                for k in order[r % 3 :] + order[: r % 3]:  # rotate the order from repeat to repeat
                    got[k].append(runs[k]())
                b, lg, bare = got["bench"][-1], got["loadgen"][-1], got["bare"][-1]
                print(
                    f"  {r + 1}: bench {b['latency_ms_p50']:.3f} / {b['latency_ms_p90']:.3f} "
                    f"(runtime {b['runtime_ms_p50']:.3f} / {b['runtime_ms_p90']:.3f})   "
                    f"loadgen {lg['latency_ms_p50']:.3f} / {lg['latency_ms_p90']:.3f}   "
                    f"bare {bare['latency_ms_p50']:.3f} / {bare['latency_ms_p90']:.3f} "
                    f"(invoke {bare['runtime_ms_p50']:.3f} / {bare['runtime_ms_p90']:.3f})   "
                    f"load {os.getloadavg()[0]:.1f}"
                )

            def med(k, col):
                return float(np.median([x[col] for x in got[k]]))

            s = {
                "target": label,
                "like_for_like": raw or len(modes) == 1,  # float samples into an int8 model: bench quantizes
                "bench_p50": med("bench", "latency_ms_p50"),
                "bench_p90": med("bench", "latency_ms_p90"),
                "lg_p50": med("loadgen", "latency_ms_p50"),
                "lg_p90": med("loadgen", "latency_ms_p90"),
                "bare_p50": med("bare", "latency_ms_p50"),
                "bench_rt_p50": med("bench", "runtime_ms_p50"),
                "bench_rt_p90": med("bench", "runtime_ms_p90"),
                "bare_invoke_p50": med("bare", "runtime_ms_p50"),
            }
            s["d_lg_p50"] = s["bench_p50"] / s["lg_p50"] - 1
            s["d_lg_p90"] = s["bench_p90"] / s["lg_p90"] - 1
            s["d_bare_p50"] = s["bench_p50"] / s["bare_p50"] - 1
            s["d_rt_p50"] = s["bench_rt_p50"] / s["bare_invoke_p50"] - 1
            summary.append(s)

    print("\nmedians over the repeats (ms); differences are bench relative to the other")
    head = (
        f"{'target':50s}{'bench p50':>10s}{'LG p50':>8s}{'diff':>8s}{'bench p90':>10s}{'LG p90':>8s}{'diff':>8s}"
        f"{'bare p50':>10s}{'diff':>8s}{'bench rt':>10s}{'invoke':>8s}{'diff':>8s}{'rt p90':>8s}"
    )
    print(head)
    ok_lg = ok_bare = True
    for s in summary:
        ok_lg &= abs(s["d_lg_p50"]) <= 0.03 and abs(s["d_lg_p90"]) <= 0.03
        if s["like_for_like"]:
            ok_bare &= abs(s["d_bare_p50"]) <= 0.03
        print(
            f"{s['target']:50s}{s['bench_p50']:10.3f}{s['lg_p50']:8.3f}{100 * s['d_lg_p50']:+7.1f}%"
            f"{s['bench_p90']:10.3f}{s['lg_p90']:8.3f}{100 * s['d_lg_p90']:+7.1f}%"
            f"{s['bare_p50']:10.3f}{100 * s['d_bare_p50']:+7.1f}%"
            f"{s['bench_rt_p50']:10.3f}{s['bare_invoke_p50']:8.3f}{100 * s['d_rt_p50']:+7.1f}%{s['bench_rt_p90']:8.3f}"
        )
    print(
        "bench rt = the runtime call alone inside bench's queries (invoke / session.run), which is what bench "
        "reported before issue 17"
    )
    print(
        f"\ntargets: bench vs LoadGen within 3 % at p50 and p90: {'met' if ok_lg else 'NOT met'}; bench vs bare loop "
        f"within 3 % at p50 (like for like: float-input int8 rows pay the quantization the bare loop skips): "
        f"{'met' if ok_bare else 'NOT met'}"
    )
    print(f"total time {time.perf_counter() - t_start:.0f} s; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
