"""How much the evaluation harness costs over bare runtime loops, with and without the preprocessed-input cache.

MobileNetV2 (random weights unless --weights), LiteRT / ONNX Runtime on --threads threads, batch --batch, on
generated 500x375 JPEGs (crops of scikit-image's photos) unless --data is given:

1. warm cache: images/s of quantship's evaluation loop (``run_targets``: cached pixels -> model input ->
   runtime -> scores, the code path of ``quantship eval``) for tflite-fp32 and tflite-int8, against a bare
   loop of ``set_tensor`` + ``invoke`` on preloaded input tensors (int8 tensors for the int8 model), same
   batch size; the two alternate --repeats times and the medians are compared. Target: >= 0.95.
2. five targets side by side on a cold cache (tflite-fp32, tflite-fp16, tflite-int8, onnx-fp32 and the
   Q/DQ entropy target): wall time of one evaluation pass against the sum of each target's bare loop plus
   one decode pass (decode, resize, crop of every image, no cache). Target: <= 1.10x.
3. the cache: disk footprint per 1,000 images at 224x224 centre crop, and the first pass that fills it
   against a pass without it (tflite-fp32).
4. with --latency: the p50 that ``quantship bench`` reports against a bare ``invoke()`` loop at batch 1, each
   in its own process, alternating --repeats times (target: within 3 %).

    python benchmarks/harness_overhead.py [--images 256] [--batch 8] [--threads 2] [--data imagenet:PATH]
    python benchmarks/harness_overhead.py --smoke    # tiny random model, 8 images, every part once: seconds

Everything is written under a ``quantship-overhead-*`` folder in the system temp folder (artifacts, the
cache, generated images), deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

WARM_TARGETS = ("tflite-fp32", "tflite-int8")
SIDE_BY_SIDE = ("tflite-fp32", "tflite-fp16", "tflite-int8", "onnx-fp32", "qdq-int8-entropy")


def make_jpegs(root: Path, n: int) -> Path:
    import cv2
    from calibration import photo_crops

    from quantship.data.classes import imagenet_classes

    wnids = [w for w, _ in imagenet_classes()[:10]]
    rng = np.random.default_rng(0)
    for i, crop in enumerate(photo_crops(n, 448, seed=3)):
        h, w = 375, 500
        img = cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR)
        d = root / wnids[i % len(wnids)]
        d.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(
            str(d / f"{i:05d}.JPEG"),
            cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
            [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(75, 95))],
        )
    return root


@dataclass(frozen=True)
class Timing:
    """Wall seconds, and CPU seconds of this process (all its threads): on a shared machine the CPU time of a
    side moves less with the other processes' load than its wall time does."""

    wall: float
    cpu: float

    def __add__(self, other: "Timing") -> "Timing":
        return Timing(self.wall + other.wall, self.cpu + other.cpu)

    def __mul__(self, factor: float) -> "Timing":
        return Timing(self.wall * factor, self.cpu * factor)


class Clock:
    def __enter__(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.timing = Timing(time.perf_counter() - self.wall, time.process_time() - self.cpu)


# ------------------------------------------------------------------------------------------- bare loops


def tflite_bare(path: Path, x: np.ndarray, batch: int, threads: int) -> Timing:
    """Seconds of ``set_tensor`` + ``invoke`` over ``x`` (float, normalised) in batches, on tensors prepared
    beforehand (quantized for an int8 input)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=threads)
    inp = interp.get_input_details()[0]
    interp.resize_tensor_input(inp["index"], [batch, *inp["shape"][1:]])
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    scale, zp = inp["quantization"]
    batches = [x[i : i + batch] for i in range(0, len(x) - batch + 1, batch)]
    if scale:
        info = np.iinfo(inp["dtype"])
        batches = [np.clip(np.round(b / scale) + zp, info.min, info.max).astype(inp["dtype"]) for b in batches]
    interp.set_tensor(inp["index"], batches[0])
    interp.invoke()  # warm-up
    with Clock() as c:
        for b in batches:
            interp.set_tensor(inp["index"], b)
            interp.invoke()
    return c.timing * (len(x) / (len(batches) * batch))


def onnx_bare(path: Path, x: np.ndarray, batch: int, threads: int, session_config) -> Timing:
    """Seconds of ``session.run`` over ``x`` in batches (the session configured as the target runs it)."""
    from quantship.runtime.onnxruntime import make_session

    sess = make_session(path, threads, ("cpu",), session_config)
    name = sess.get_inputs()[0].name
    batches = [x[i : i + batch] for i in range(0, len(x) - batch + 1, batch)]
    sess.run(None, {name: batches[0]})  # warm-up
    with Clock() as c:
        for b in batches:
            sess.run(None, {name: b})
    return c.timing * (len(x) / (len(batches) * batch))


def bare_seconds(target, artifact, x: np.ndarray, batch: int, threads: int) -> Timing:
    if target.spec.backend == "tflite":
        return tflite_bare(artifact.path, x, batch, threads)
    return onnx_bare(artifact.path, x, batch, threads, target.session_config)


def bare_p50(path: Path, threads: int, queries: int) -> float:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=threads)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    interp.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
    for _ in range(20):
        interp.invoke()
    ms = []
    for _ in range(queries):
        t = time.perf_counter()
        interp.invoke()
        ms.append((time.perf_counter() - t) * 1e3)
    return float(np.percentile(ms, 50))


# ------------------------------------------------------------------------------------------ harness side


def eval_seconds(ctx, targets, artifacts, evalset, task, batch: int, workers: int, warmup) -> Timing:
    """Wall seconds of one evaluation pass of ``targets`` side by side (quantship eval's loop), after one batch
    of other images (``warmup``) has sized the runtimes' tensors, as the bare loops' warm-up call does."""
    from quantship.evaluate.loop import Batches, run_targets
    from quantship.targets.run import side_by_side

    ctx = side_by_side(ctx, targets)  # as evaluate_targets runs them
    runners = {t.name: t.make_runner(ctx, artifacts[t.name]).activate() for t in targets}
    try:
        run_targets(runners, Batches(warmup, batch, workers), ctx.loaded.preprocess, task)
        with Clock() as c:
            runs = run_targets(runners, Batches(evalset, batch, workers), ctx.loaded.preprocess, task)
    finally:
        for r in runners.values():
            r.deactivate()
    assert all(task.count(r.arrays) == len(evalset) for r in runs.values())
    return c.timing


def decode_seconds(evalset, spec, batch: int, workers: int) -> Timing:
    """One pass of decoding, resizing and cropping every image (no cache), as the loop's loader does it."""
    from quantship.data.datasets import iter_batches

    with Clock() as c:
        for b in iter_batches(evalset, spec, batch, workers, cache=None):
            b.pixels.sum(dtype=np.uint64)  # touch the pixels
    return c.timing


def use_cache(root: Path | None) -> None:
    from quantship.config import InputCacheOptions
    from quantship.jobs import use_input_cache

    use_input_cache(InputCacheOptions(enabled=root is not None, path=root))


def cache_footprint(root: Path) -> tuple[int, int]:
    """(bytes on disk, images held) of a cache folder."""
    import json

    from quantship.data.cache import InputCache

    images = sum(len(json.loads(p.read_text())["positions"]) for p in root.glob("*/shard-*.json"))
    return InputCache(root, 0).usage(), images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--weights", default="random")
    p.add_argument("--data", help="KIND:PATH (default: generated JPEGs)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=max(2, os.cpu_count() or 2), help="decoding threads")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per side; medians compared (3)")
    p.add_argument("--latency", action="store_true", help="also compare bench's p50 with a bare loop's")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 8 images, every part once (seconds)")
    p.add_argument("--_bare", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke and not args._bare:
        args.images, args.batch, args.repeats, args.queries, args.latency = 8, 4, 1, 5, True
    if args._bare:  # worker: the bare loop in a fresh process, like quantship bench's own worker
        print(bare_p50(Path(args._bare), args.threads, args.queries))
        return
    work = Path(tempfile.mkdtemp(prefix="quantship-overhead-"))
    if args.smoke:
        from smoke import tiny_model

        args.model, args.weights = tiny_model(work), None
    try:
        run(args, work)
    finally:
        if args.keep:
            print(f"\nwork folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    from smoke import load

    from quantship.data.datasets import load_dataset, split_calibration
    from quantship.evaluate.tasks import ClassificationTask
    from quantship.runtime.base import RunnerOptions
    from quantship.targets import BuildContext, parse_targets
    from quantship.targets.run import build_targets, calibration_data

    calib_n = 4 if args.smoke else 64
    data = args.data or f"imagenet:{make_jpegs(work / 'data', args.images + calib_n)}"
    dataset = load_dataset(data)
    calib, evalset = split_calibration(dataset, calib_n, limit=min(args.images, len(dataset) - calib_n), seed=0)
    loaded = load(args.model, args.weights)
    spec = loaded.preprocess
    use_cache(None)  # calibration decoded without the cache: the eval images stay cold for part 2
    targets = parse_targets(SIDE_BY_SIDE)
    ctx = BuildContext(
        loaded,
        work,
        calibration=calibration_data(calib, loaded),
        runner_options=RunnerOptions(threads=args.threads),
        log_path=work / "convert.log",
    )
    task = ClassificationTask()
    warmup = calib.subset(range(args.batch))  # not evaluation images: they stay cold
    try:
        artifacts, failures = build_targets(ctx, targets)
        if failures:
            raise SystemExit(f"targets failed to build: {failures}")
        from quantship.data.datasets import iter_batches

        x = np.concatenate([b.inputs[:, 0] for b in iter_batches(evalset, spec, 32, cache=None)])
        n = len(evalset)
        print(
            f"{args.model} ({args.weights} weights), {n} images ({data}), batch {args.batch}, {args.threads} "
            f"threads, {args.workers} decoding threads, {os.cpu_count()} cores"
        )
        by_name = {t.name: t for t in targets}

        # 3. the pass that fills the cache against a pass without it (tflite-fp32 alone), and its footprint
        fp32 = [by_name["tflite-fp32"]]
        use_cache(None)
        no_cache = eval_seconds(ctx, fp32, artifacts, evalset, task, args.batch, args.workers, warmup)
        fill_root = work / "cache-fill"
        use_cache(fill_root)
        fill = eval_seconds(ctx, fp32, artifacts, evalset, task, args.batch, args.workers, warmup)
        disk, held = cache_footprint(fill_root)

        # 2. five targets side by side, cold cache
        use_cache(work / "cache-side-by-side")
        side = eval_seconds(ctx, targets, artifacts, evalset, task, args.batch, args.workers, warmup)
        decode = decode_seconds(evalset, spec, args.batch, args.workers)
        bare = {t.name: bare_seconds(t, artifacts[t.name], x, args.batch, args.threads) for t in targets}
        bound = sum(bare.values(), Timing(0.0, 0.0)) + decode

        # 1. warm cache against the bare loop, alternating
        use_cache(fill_root)
        warm: dict[str, tuple[list[Timing], list[Timing]]] = {}
        for name in WARM_TARGETS:
            t = by_name[name]
            warm[name] = ([], [])
            for _ in range(args.repeats):
                warm[name][0].append(eval_seconds(ctx, [t], artifacts, evalset, task, args.batch, args.workers, warmup))
                warm[name][1].append(bare_seconds(t, artifacts[name], x, args.batch, args.threads))
    finally:
        ctx.close()
        use_cache(None)

    def med(ts: list[Timing], what: str) -> float:
        return float(np.median([getattr(t, what) for t in ts]))

    print(f"\n1. warm cache, eval vs bare LiteRT loop (medians of {args.repeats} alternating runs)")
    print(f"{'target':14s}{'eval img/s':>12s}{'bare img/s':>12s}{'ratio':>8s}{'CPU-time ratio':>16s}")
    ok_warm = True
    for name, (ours, theirs) in warm.items():
        e, b = n / med(ours, "wall"), n / med(theirs, "wall")
        ok_warm &= e / b >= 0.95
        print(f"{name:14s}{e:12.1f}{b:12.1f}{e / b:8.3f}{med(theirs, 'cpu') / med(ours, 'cpu'):16.3f}")
    print(f"   target >= 0.95 (wall): {'met' if ok_warm else 'NOT met'}")

    print("\n2. five targets side by side, cold cache (seconds for all images: wall / CPU)")
    for name, t in bare.items():
        print(f"   bare {name:18s}{t.wall:8.2f} /{t.cpu:7.2f}")
    print(f"   decode pass (no cache)  {decode.wall:8.2f} /{decode.cpu:7.2f}")
    ratio = side.wall / bound.wall
    print(
        f"   quantship eval {side.wall:.2f} s vs bare loops + one decode {bound.wall:.2f} s: {ratio:.3f}x "
        f"(target <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'}); CPU time {side.cpu:.2f} vs {bound.cpu:.2f} s: "
        f"{side.cpu / bound.cpu:.3f}x"
    )

    print("\n3. input cache")
    print(
        f"   disk per 1,000 images at {spec.size[0]}x{spec.size[1]} {spec.crops.value} crop: "
        f"{disk / held * 1000 / 1e6:.1f} MB ({held} images, {disk / 1e6:.1f} MB)"
    )
    print(
        f"   first pass (tflite-fp32): {no_cache.wall:.2f} s without the cache, {fill.wall:.2f} s filling it "
        f"({100 * (fill.wall / no_cache.wall - 1):+.1f} %; CPU time {100 * (fill.cpu / no_cache.cpu - 1):+.1f} %)"
    )
    if args.latency:
        latency(args, artifacts, by_name)


def latency(args: argparse.Namespace, artifacts, by_name) -> None:
    from quantship.evaluate.bench import BenchConfig, bench

    print(f"\n4. latency at batch 1: bench p50 vs a bare invoke() loop (medians of {args.repeats}, own processes)")
    for name in WARM_TARGETS:
        path = artifacts[name].path
        ours, bare = [], []
        for _ in range(args.repeats):
            # The bare loop holds the model's own input type (int8 for an int8 input): bench with raw samples
            # times the same thing (benchmarks/latency_parity.py compares the full query latency too).
            cfg = BenchConfig(
                str(path), name, threads=args.threads, warmup_seconds=0.0 if args.smoke else 1.0,
                min_queries=args.queries, min_seconds=0.0 if args.smoke else 3.0, raw_inputs=True,
            )  # fmt: skip
            ours.append(bench([cfg])[0]["latency_ms_p50"])
            cmd = [sys.executable, __file__, "--_bare", str(path), "--threads", str(args.threads)]
            out = subprocess.run([*cmd, "--queries", str(args.queries)], capture_output=True, text=True, check=True)
            bare.append(float(out.stdout.strip().splitlines()[-1]))
        p50, b50 = float(np.median(ours)), float(np.median(bare))
        print(f"   {name:14s} bench {p50:.2f} ms, bare {b50:.2f} ms ({100 * (p50 / b50 - 1):+.1f} %)")


if __name__ == "__main__":
    main()
