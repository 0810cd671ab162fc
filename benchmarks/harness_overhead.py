"""How much the evaluation harness costs over a bare LiteRT loop.

For MobileNetV2 tflite-fp32 and tflite-int8 on 2 threads:
1. throughput: images/s of quantship's evaluation (decode + preprocess + infer + metrics, the code path of
   ``quantship eval``) against a bare loop of ``interpreter.invoke()`` on preloaded tensors, same batch size;
2. latency: the p50 that ``quantship bench`` reports (its own process, warm-up, >= N queries) against a bare
   ``time.perf_counter()`` loop around ``invoke()`` at batch 1 (also in its own process); the two alternate
   ``--repeats`` times and their medians are compared.

Targets (issue 6): eval throughput >= 0.95 of the bare loop; reported p50 within 3 % of the bare loop's.

    python benchmarks/harness_overhead.py [--images 256] [--batch 8] [--threads 2] [--data imagenet:PATH]

Without --data, JPEGs are generated from crops of scikit-image's photos (ImageNet-like sizes, ~500x375).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))


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


def bare_throughput(path: Path, x: np.ndarray, batch: int, threads: int) -> float:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=threads)
    inp = interp.get_input_details()[0]
    interp.resize_tensor_input(inp["index"], [batch, *inp["shape"][1:]])
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    scale, zp = inp["quantization"]
    batches = [x[i : i + batch] for i in range(0, len(x) - batch + 1, batch)]
    if scale:
        batches = [np.clip(np.round(b / scale) + zp, -128, 127).astype(inp["dtype"]) for b in batches]
    interp.set_tensor(inp["index"], batches[0])
    interp.invoke()  # warm-up
    t = time.perf_counter()
    for b in batches:
        interp.set_tensor(inp["index"], b)
        interp.invoke()
    return len(batches) * batch / (time.perf_counter() - t)


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--weights", default="random")
    p.add_argument("--data", help="KIND:PATH (default: generated JPEGs)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3, help="alternating latency runs per side; medians compared (3)")
    p.add_argument("--_bare", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._bare:  # worker: the bare loop in a fresh process, like quantship bench's own worker
        print(bare_p50(Path(args._bare), args.threads, args.queries))
        return

    from quantship.data.datasets import iter_batches, load_dataset, split_calibration
    from quantship.evaluate.bench import BenchConfig, bench
    from quantship.jobs.common import calibration_batches_factory, calibration_info, evaluate_classification
    from quantship.models.loading import load_model
    from quantship.targets import BuildContext, get_target

    work = Path(tempfile.mkdtemp(prefix="quantship-overhead-"))
    data = args.data or f"imagenet:{make_jpegs(work / 'data', args.images + 64)}"
    dataset = load_dataset(data)
    calib, evalset = split_calibration(dataset, 64, limit=min(args.images, len(dataset) - 64), seed=0)
    loaded = load_model(args.model, args.weights)
    ctx = BuildContext(
        loaded,
        work,
        calibration_batches_factory(calib, loaded),
        calibration_info(calib, loaded),
        threads=args.threads,
        log_path=work / "convert.log",
    )
    x = np.concatenate([b.inputs[:, 0] for b in iter_batches(evalset, loaded.preprocess, 32)])
    print(
        f"{args.model} ({args.weights} weights), {len(evalset)} images ({data}), batch {args.batch}, "
        f"{args.threads} threads, {os.cpu_count()} cores"
    )
    print(
        f"\n{'target':14s}{'eval img/s':>12s}{'bare img/s':>12s}{'ratio':>8s}"
        f"{'bench p50':>12s}{'bare p50':>10s}{'diff':>8s}"
    )
    ok = True
    for name in ("tflite-fp32", "tflite-int8"):
        t = get_target(name)
        art = t.build(ctx, t.spec)
        evaluate_classification(
            evalset.subset(range(min(16, len(evalset)))), ctx, [t], {name: art}, args.batch
        )  # warm caches
        start = time.perf_counter()
        results, skipped = evaluate_classification(
            evalset, ctx, [t], {name: art}, args.batch, workers=max(2, os.cpu_count() or 2)
        )
        eval_ips = results[0].metric.count / (time.perf_counter() - start)
        bare_ips = bare_throughput(art.path, x, args.batch, args.threads)
        # Both latency sides run in fresh processes, alternating, so that machine noise hits them alike.
        ours, bare = [], []
        for _ in range(args.repeats):
            (row,) = bench(
                [
                    BenchConfig(
                        str(art.path),
                        name,
                        threads=args.threads,
                        warmup_seconds=1.0,
                        min_queries=args.queries,
                        min_seconds=3.0,
                    )
                ]
            )
            ours.append(row["latency_ms_p50"])
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--_bare",
                    str(art.path),
                    "--threads",
                    str(args.threads),
                    "--queries",
                    str(args.queries),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            bare.append(float(out.stdout.strip().splitlines()[-1]))
        p50, b50 = float(np.median(ours)), float(np.median(bare))
        ratio, diff = eval_ips / bare_ips, p50 / b50 - 1
        ok &= ratio >= 0.95 and abs(diff) <= 0.03
        print(f"{name:14s}{eval_ips:12.1f}{bare_ips:12.1f}{ratio:8.3f}{p50:10.2f}ms{b50:8.2f}ms{100 * diff:+7.1f}%")
    ctx.close()
    print(f"\ntargets: eval throughput >= 0.95 of the bare loop, reported p50 within 3 %: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
