"""Sign-off on Ray against the local executor: does a second worker halve the evaluation?

The same plan (2 generated CNNs x 4 targets = 8 units: keras-fp32 reference, tflite-fp32, tflite-int8, onnx-fp32;
``--images`` evaluation images in chunks of ``--chunk``) runs three times, each in a fresh output folder and its
own process: with the local executor, and with Ray on a local instance of 1 and of 2 CPUs (1 and 2 workers).
Every unit is single-threaded, conversion included: ``threads: 1`` (LiteRT, ONNX Runtime), one image-decoding
thread, TensorFlow's thread pools at 1 (``TF_NUM_INTRAOP_THREADS``/``TF_NUM_INTEROP_THREADS``, for conversion
and the Keras reference) and ``OMP_NUM_THREADS=1``. The preprocessed-input cache is off, so that every run
decodes its images (a later run would otherwise read what an earlier one cached).

Printed per run: the wall time of the whole sign-off (Ray's start and stop included), its build phase (models
loaded, artifacts built: for Ray, from the first task submitted to the last build finished) and its evaluation
phase (the rest: chunks evaluated and stored, rows made), for Ray how busy the workers were in the evaluation
phase (the chunk tasks' run time over phase x workers: low means waiting, high with little speed-up means the
CPUs were shared with other work), and the speed-up over the 1-worker Ray run with the build phase included and
excluded.

    python benchmarks/signoff_scaling.py [--images 512] [--chunk 64] [--size 128] [--keep DIR]
    python benchmarks/signoff_scaling.py --smoke    # 8 images of 32 px, the local executor only (no Ray): seconds

Target (issue 18): on 2 cores, 2 workers at least 1.6x faster than 1 worker once the build phase is excluded.
Timings on a machine that other jobs use are noisy: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SINGLE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1"}
RUNS = (("local", None), ("ray, 1 worker", 1), ("ray, 2 workers", 2))
TARGETS = ["tflite-fp32", "tflite-int8", "onnx-fp32"]


def make_models(root: Path, size: int) -> list[Path]:
    """Two CNNs (random weights, 1000 classes) of full 3x3 convolutions (about 0.1 and 0.2 GMACs at 128 px), so
    that inference, not JPEG decoding, is the work: a unit then keeps one core busy, not one and a bit (decoding
    runs in its own thread, overlapping inference)."""
    import keras

    paths = []
    for seed, width in ((0, 16), (1, 24)):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((size, size, 3), name="input")
        x = keras.layers.Conv2D(width, 3, strides=2, padding="same", activation="relu")(inputs)
        for k in range(3):
            x = keras.layers.Conv2D(width * 2 ** (k + 1), 3, strides=2 if k else 1, padding="same", activation="relu")(
                x
            )
        x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(1000, activation="softmax")(x)
        path = root / f"cnn{width}.keras"
        keras.Model(inputs, outputs, name=f"cnn{width}").save(path)
        paths.append(path)
    return paths


def make_images(root: Path, n: int, size: int) -> Path:
    """``n`` small JPEGs (smooth colour fields with noise; cheap to decode) in ImageNet synset folders."""
    import cv2

    from quantship.data.classes import imagenet_classes

    wnids = [w for w, _ in imagenet_classes()[:10]]
    rng = np.random.default_rng(0)
    for i in range(n):
        base = rng.integers(0, 255, (4, 5, 3)).astype(np.uint8)
        img = cv2.resize(base, (size, size), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        d = root / wnids[i % len(wnids)]
        d.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / f"{i:05d}.JPEG"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return root


def write_plan(path: Path, models: list[Path], data: Path, images: int, chunk: int, size: int) -> Path:
    import yaml

    pre = {"mode": "tf", "size": size, "crop_pct": 1.0}
    plan = {
        "name": "scaling",
        "dataset": f"imagenet:{data}",
        "limit": images,
        "chunk_images": chunk,
        "threads": 1,
        "workers": 1,
        "calibration": {"num_images": 32},
        "models": [{"name": str(m), "preprocess": pre} for m in models],
        "targets": TARGETS,
        "gates": [{"metric": "top1", "max_drop_points": 100}],
        "bench": False,  # this measures how the evaluation pass scales; the latency pass runs on one machine anyway
    }
    path.write_text(yaml.safe_dump(plan))
    return path


def run_one(plan_file: str, out: str, cpus: int | None) -> dict:
    """One sign-off in this process (called in a child process, so that each run starts cold)."""
    from quantship.config import InputCacheOptions
    from quantship.data.cache import configure
    from quantship.signoff.plan import SignoffPlan
    from quantship.signoff.ray_executor import RayExecutor
    from quantship.signoff.run import signoff
    from quantship.signoff.units import LocalExecutor

    configure(InputCacheOptions(enabled=False))  # every run decodes its images (Ray workers get the setting too)
    plan = SignoffPlan.load(plan_file)
    executor = LocalExecutor() if cpus is None else RayExecutor(local_cpus=cpus, local_gpus=0)
    t = time.perf_counter()
    rows, _ = signoff(plan, Path(out), executor=executor)
    wall = time.perf_counter() - t
    record = executor.record()
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    return {"wall_s": wall, **record["timings"], "units": len(rows), "workers": record.get("workers")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512, help="evaluation images per unit (512)")
    p.add_argument("--chunk", type=int, default=64, help="images per chunk (64)")
    p.add_argument("--size", type=int, default=128, help="model input size (128)")
    p.add_argument("--keep", help="keep the generated files and results in this folder")
    p.add_argument("--run", nargs=3, metavar=("PLAN", "OUT", "CPUS"), help=argparse.SUPPRESS)
    p.add_argument("--setup", metavar="ROOT", help=argparse.SUPPRESS)
    p.add_argument(
        "--smoke", action="store_true", help="8 images of 32 px in chunks of 4, the local executor only (seconds)"
    )
    args = p.parse_args()
    if args.smoke:
        args.images, args.chunk, args.size = 8, 4, 32
    if args.setup:
        root = Path(args.setup)
        models = make_models(root, args.size)
        data = make_images(root / "data", args.images + 32, args.size)
        write_plan(root / "plan.yaml", models, data, args.images, args.chunk, args.size)
        return 0
    if args.run:
        plan_file, out, cpus = args.run
        print(json.dumps(run_one(plan_file, out, None if cpus == "local" else int(cpus))))
        return 0

    root = Path(args.keep or tempfile.mkdtemp(prefix="quantship-scaling-"))
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **SINGLE_THREAD, "TF_CPP_MIN_LOG_LEVEL": "3", "QUANTSHIP_CACHE": str(root / "cache")}
    env.pop("RAY_ADDRESS", None)
    # Models and images are made in a child process too: this one stays free of TensorFlow.
    setup = [sys.executable, __file__, "--images", str(args.images), "--chunk", str(args.chunk)]
    subprocess.run(
        [*setup, "--size", str(args.size), "--setup", str(root)], env=env, check=True, stderr=subprocess.DEVNULL
    )
    units = 2 * (len(TARGETS) + 1)
    chunks = units * -(-args.images // args.chunk)
    print(f"plan: 2 models x {len(TARGETS) + 1} targets = {units} units, {args.images} images each, {chunks} chunks")
    results = {}
    for name, cpus in RUNS[:1] if args.smoke else RUNS:  # a smoke run starts no Ray instance
        out = root / f"out-{'local' if cpus is None else cpus}"
        shutil.rmtree(out, ignore_errors=True)
        load = os.getloadavg()[0]
        res = subprocess.run(
            [
                sys.executable,
                __file__,
                "--run",
                str(root / "plan.yaml"),
                str(out),
                "local" if cpus is None else str(cpus),
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        if res.returncode:
            print(res.stdout[-2000:], res.stderr[-4000:], file=sys.stderr)
            return 1
        results[name] = {**json.loads(res.stdout.strip().splitlines()[-1]), "load": load}
        r = results[name]
        busy = ""
        if r.get("chunk_tasks_s") and r.get("workers"):
            busy = f"   workers busy {100 * r['chunk_tasks_s'] / (r['evaluate_s'] * cpus):3.0f} %"
        print(
            f"  {name:15s} wall {r['wall_s']:7.1f} s   build {r['build_s']:6.1f} s   evaluate {r['evaluate_s']:6.1f} s"
            f"{busy}   (load average at start {load:.1f})",
            flush=True,
        )
    if args.smoke:
        print(f"smoke run: the local executor only; results in {root}")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        return 0
    one, two = results["ray, 1 worker"], results["ray, 2 workers"]
    print(
        f"speed-up of 2 workers over 1: {one['wall_s'] / two['wall_s']:.2f}x build included, "
        f"{one['evaluate_s'] / two['evaluate_s']:.2f}x build excluded (target >= 1.6x)"
    )
    local = results["local"]
    print(
        f"Ray with 2 workers against the local executor: {local['wall_s'] / two['wall_s']:.2f}x build included, "
        f"{local['evaluate_s'] / two['evaluate_s']:.2f}x build excluded"
    )
    print(f"CPU: {_cpu()}; {os.cpu_count()} cores; results in {root}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _cpu() -> str:
    from quantship.evaluate.environment import cpu_flags, cpu_model

    return f"{cpu_model()} (int8 flags: {cpu_flags()})"


if __name__ == "__main__":
    sys.exit(main())
