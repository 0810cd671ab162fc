"""The MobileNet paper's table with real weights: EfficientNet-Lite0/1/2 and MobileNetV2 (torchvision), each at
its own resolution: MACs, parameters, TFLite fp32 and int8 latency (batch 1, 2 threads, XNNPACK) and the int8
model's top-1 agreement with fp32 (and mean L1 of the probability vectors) on the evaluation images of
benchmarks/int8_fidelity.py (scikit-image photos and crops; calibration crops of other photos).

    python benchmarks/family_table.py                       # ~10 min on 2 cores
    python benchmarks/family_table.py --int8 tflite-int8,tflite-int8-percentile
    python benchmarks/family_table.py --smoke               # tiny random model, 6 images: runs in seconds

Latency is the median over at least --iters calls after warm-up, the runtime call alone; on a shared machine it
is noisy (the lead reruns it on a quiet one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2_tv")


def measure(model: str, data: Path, int8_targets: list[str], threads: int, iters: int, out: Path) -> dict:
    from int8_fidelity import load_inputs

    from quantship.evaluate.latency import measure_latency
    from quantship.evaluate.loop import runner_outputs
    from quantship.models.stats import count_macs
    from quantship.runtime.base import RunnerOptions
    from quantship.targets import BuildContext, get_target

    loaded, calib, x, _ = load_inputs(model, data, workers=2)
    ref = np.concatenate([np.asarray(loaded.model(x[i : i + 32], training=False)) for i in range(0, len(x), 32)])
    ctx = BuildContext(
        loaded,
        out / loaded.name,
        calibration=calib,
        runner_options=RunnerOptions(threads=threads),
        log_path=out / "convert.log",
    )
    stats = {"params": int(loaded.model.count_params()), "macs": count_macs(loaded.model)}
    row = {"model": loaded.name, "input": int(loaded.input_shape[0]), **stats, "images": len(x)}
    try:
        for name in ["tflite-fp32", *int8_targets]:
            target = get_target(name)
            artifact = target.build(ctx, target.spec)
            with target.make_runner(ctx, artifact) as r:
                y = runner_outputs(r, x)
                lat = measure_latency(r, x[:1], warmup=10, min_iters=iters)
            row[f"{name}_ms"] = lat["latency_ms_p50"]
            row[f"{name}_mb"] = artifact.manifest["size_bytes"] / 1e6
            if name != "tflite-fp32":
                row[f"{name}_agreement"] = float((y.argmax(1) == ref.argmax(1)).mean())
                row[f"{name}_l1"] = float(np.abs(y - ref).sum(1).mean())
    finally:
        ctx.close()
    return row


def markdown(rows: list[dict], int8_targets: list[str], threads: int) -> str:
    head = ["model", "input", "MACs", "params", "fp32 ms"]
    for t in int8_targets:
        head += [f"{t} ms", f"{t} agreement (L1)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], str(r["input"]), f"{r['macs'] / 1e6:.0f}M", f"{r['params'] / 1e6:.2f}M"]
        cells.append(f"{r['tflite-fp32_ms']:.1f}")
        for t in int8_targets:
            cells += [f"{r[f'{t}_ms']:.1f}", f"{r[f'{t}_agreement']:.3f} ({r[f'{t}_l1']:.3f})"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nTFLite (LiteRT, XNNPACK), batch 1, {threads} threads, median latency; {rows[0]['images']} images.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from photos import write_photo_sets

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--int8", default="tflite-int8", help="int8 targets to measure (comma-separated)")
    p.add_argument("--eval-images", type=int, default=500)
    p.add_argument("--calib-images", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--out", default="family-table-out")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 6 images: checks the script runs (seconds)")
    args = p.parse_args(argv)
    if args.smoke:
        from smoke import tiny_model

        args.models = tiny_model(Path(args.out))
        args.eval_images, args.calib_images, args.iters = 6, 4, 5
    out = Path(args.out)
    data = out / "photos"
    write_photo_sets(data, args.eval_images, args.calib_images)
    int8 = [t for t in args.int8.split(",") if t]
    rows = []
    for model in [m for m in args.models.split(",") if m]:
        t0 = time.perf_counter()
        rows.append(measure(model, data, int8, args.threads, args.iters, out))
        print(json.dumps(rows[-1]), f"({time.perf_counter() - t0:.0f} s)", flush=True)
    table = markdown(rows, int8, args.threads)
    print(table)
    (out / "family_table.json").write_text(json.dumps(rows, indent=1))
    (out / "family_table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
