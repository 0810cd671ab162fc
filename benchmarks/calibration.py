"""Entropy calibration: quantship's streaming pass vs onnxruntime.quantization.quantize_static.

Both calibrate the same ONNX model (MobileNetV2 by default) on the same images and produce an int8 Q/DQ
model; each runs in its own process so that peak memory is its own. Printed per tool: wall time, peak
resident memory (absolute and above the process's baseline after loading model and images), and top-1
agreement of its int8 model with fp32 on separate evaluation images.

    python benchmarks/calibration.py                       # MobileNetV2 (random weights), 256 images
    python benchmarks/calibration.py --model efficientnet_lite0 --weights pretrained
    python benchmarks/calibration.py --data imagenet:/data/val   # real images instead of photo crops
    python benchmarks/calibration.py --smoke                       # tiny model, 8 images: runs, figures meaningless

Targets (issue 3): at least 5x faster and at most a quarter of ONNX Runtime's peak memory, agreement no
worse. Without --data the images are random crops/flips of the photos scikit-image ships.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakRss:
    """Samples this process's RSS every 5 ms (ru_maxrss would include the parent's history after fork)."""

    def __init__(self):
        self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def photo_crops(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 RGB crops (size x size) of scikit-image's photos, for use without a dataset."""
    import cv2
    from skimage import data

    photos = [
        data.astronaut(),
        data.coffee(),
        data.chelsea(),
        data.rocket(),
        data.hubble_deep_field(),
        data.retina(),
        data.immunohistochemistry(),
        data.stereo_motorcycle()[0],
    ]
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = photos[rng.integers(len(photos))]
        h, w = img.shape[:2]
        s = int(min(h, w) * rng.uniform(0.3, 1.0))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        crop = cv2.resize(np.ascontiguousarray(img[y : y + s, x : x + s]), (size, size), interpolation=cv2.INTER_AREA)
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out


def prepare(args, work: Path) -> None:
    """Export the model to ONNX and write preprocessed calibration and evaluation arrays."""
    from smoke import load

    from quantship.convert.onnx import convert_to_onnx
    from quantship.data.preprocess import normalize, preprocess_image

    loaded = load(args.model, args.weights)
    convert_to_onnx(loaded.model, work / "model.onnx", log_path=work / "convert.log")
    if args.data:
        from quantship.data.datasets import iter_batches, load_dataset, split_calibration

        ds = load_dataset(args.data)
        calib, ev = split_calibration(ds, args.images, limit=args.eval_images, seed=0)
        cal = np.concatenate([b.inputs[:, 0] for b in iter_batches(calib, loaded.preprocess, 32)])
        evx = np.concatenate([b.inputs[:, 0] for b in iter_batches(ev, loaded.preprocess, 32)])
    else:
        size = loaded.preprocess.size[0]
        cal = normalize(photo_crops(args.images, size, seed=1), loaded.preprocess)
        evx = normalize(photo_crops(args.eval_images, size, seed=2), loaded.preprocess)
        del preprocess_image
    np.save(work / "calib.npy", cal.astype(np.float32))
    np.save(work / "eval.npy", evx.astype(np.float32))


def run_ours(work: Path, batch: int, threads: int | None) -> dict:
    import onnx

    from quantship.calibrate.api import calibrate
    from quantship.convert.calibrated import CalibrationOutputs, collect_statistics, write_outputs

    model = onnx.load(str(work / "model.onnx"))
    cal = np.load(work / "calib.npy")
    base = _rss()
    with PeakRss() as mem:
        t = time.perf_counter()
        collector = collect_statistics(
            model, (cal[i : i + batch] for i in range(0, len(cal), batch)), scope="qdq", threads=threads
        )
        result = calibrate(collector, "entropy")
        write_outputs(result, model, CalibrationOutputs(qdq=work / "ours.onnx"))
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_rss": mem.peak, "baseline_rss": base, "output": "ours.onnx"}


def run_ort(work: Path, batch: int, threads: int | None) -> dict:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    cal = np.load(work / "calib.npy")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(cal):
                return None
            x = cal[self.i : self.i + batch]
            self.i += batch
            return {"input": x}

    base = _rss()
    with PeakRss() as mem:
        t = time.perf_counter()
        quantize_static(
            str(work / "model.onnx"),
            str(work / "ort.onnx"),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Entropy,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_rss": mem.peak, "baseline_rss": base, "output": "ort.onnx"}


def agreement(work: Path, name: str, threads: int | None) -> float:
    from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT, OnnxRunner

    x = np.load(work / "eval.npy")
    outs = []
    for f in ("model.onnx", name):
        # Both int8 models are Q/DQ models standing for TensorRT's int8: run them as fake-quant (ORT's fused int8
        # kernels give CPU-dependent numbers).
        session = () if f == "model.onnx" else QDQ_FAKE_QUANT
        with OnnxRunner(work / f, num_threads=threads, session_config=session) as r:
            outs.append(np.concatenate([next(iter(r.infer(x[i : i + 32]).values())) for i in range(0, len(x), 32)]))
    return float(np.mean(outs[0].argmax(1) == outs[1].argmax(1)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--weights", default=None, help="weights (default: pretrained where built in, else random)")
    p.add_argument("--data", help="KIND:PATH of real images (default: crops of scikit-image photos)")
    p.add_argument("--images", type=int, default=256, help="calibration images (256)")
    p.add_argument("--eval-images", type=int, default=256, help="images for the agreement check (256)")
    p.add_argument("--batch", type=int, default=16, help="calibration batch size, the same for both (16)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", help="working folder (default: a temporary one)")
    p.add_argument("--smoke", action="store_true", help="tiny model, 8 images: checks the script runs (seconds)")
    p.add_argument("--_run", choices=["ours", "ort"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke and not args._run:
        from smoke import tiny_model

        args.work = args.work or tempfile.mkdtemp(prefix="quantship-bench-smoke-")
        args.model, args.weights = tiny_model(Path(args.work)), "random"
        args.images, args.eval_images, args.batch = 8, 8, 4
    if args.weights is None:
        from quantship.models import get_model_spec

        args.weights = "pretrained" if get_model_spec(args.model).pretrained else "random"

    if args._run:
        fn = run_ours if args._run == "ours" else run_ort
        print(json.dumps(fn(Path(args.work), args.batch, args.threads)))
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="quantship-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"model {args.model} ({args.weights} weights), {args.images} calibration images, batch {args.batch}, "
        f"{'data ' + args.data if args.data else 'crops of scikit-image photos'}; work dir {work}"
    )
    prepare(args, work)
    results = {}
    for tool in ("ours", "ort"):
        cmd = [
            sys.executable,
            __file__,
            "--_run",
            tool,
            "--work",
            str(work),
            "--batch",
            str(args.batch),
            "--model",
            args.model,
            "--weights",
            args.weights,
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{tool} failed:\n{proc.stderr[-3000:]}")
        results[tool] = json.loads(proc.stdout.strip().splitlines()[-1])
        results[tool]["agreement"] = agreement(work, results[tool]["output"], args.threads)

    print(f"\n{'':28s}{'quantship':>14s}{'onnxruntime':>14s}{'ratio':>10s}")
    o, r = results["ours"], results["ort"]
    print(f"{'wall time (s)':28s}{o['seconds']:14.2f}{r['seconds']:14.2f}{r['seconds'] / o['seconds']:9.1f}x")
    mb = lambda b: b / 2**20  # noqa: E731
    print(
        f"{'peak RSS (MiB)':28s}{mb(o['peak_rss']):14.0f}{mb(r['peak_rss']):14.0f}{o['peak_rss'] / r['peak_rss']:10.2f}"
    )
    po, pr = o["peak_rss"] - o["baseline_rss"], r["peak_rss"] - r["baseline_rss"]
    print(f"{'peak above baseline (MiB)':28s}{mb(po):14.0f}{mb(pr):14.0f}{po / max(pr, 1):10.2f}")
    print(f"{'top-1 agreement with fp32':28s}{o['agreement']:14.4f}{r['agreement']:14.4f}")
    speed_ok, mem_ok, acc_ok = r["seconds"] / o["seconds"] >= 5, po <= pr / 4, o["agreement"] >= r["agreement"]
    print(
        f"\ntargets: >=5x faster: {'met' if speed_ok else 'NOT met'}; <=1/4 of ORT's peak memory (above baseline): "
        f"{'met' if mem_ok else 'NOT met'}; agreement no worse: {'met' if acc_ok else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
