"""A sign-off without labels: EfficientNet-Lite0 and MobileNetV2 int8 targets against fp32 on scikit-image's
photos and seeded crops of them (``images:``), gated on top-1 agreement and on the mean L1 distance of the
probability vectors. Prints each gate's verdict, interval and the images it would need to settle.

    PYTHONPATH=. python benchmarks/label_free_signoff.py [--smoke] [--images N] [--out DIR]

``--smoke``: the tiny random-weight model of ``smoke.py`` on 12 photos and crops, one target (its figures mean
nothing; it proves the script runs).

The crops of one photo are correlated: the intervals treat them as independent images, so they are narrower
than the truth (the benchmark shows how the verdicts and the images-to-settle figures behave, not a release).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))


def main() -> int:
    from photos import write_photo_sets

    from quantship.cli import main as cli

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="the tiny model, 12 images, one target")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--out", default="runs/label-free-signoff")
    p.add_argument("--targets", default="tflite-int8,ort-int8-entropy")
    args = p.parse_args()
    images = 12 if args.smoke else args.images
    out = Path(args.out)
    calib_images = 8 if args.smoke else 100
    evals, calib = write_photo_sets(out / "data", eval_images=images, calib_images=calib_images)
    if args.smoke:
        from smoke import PREPROCESS, tiny_model

        models = [{"name": tiny_model(out), "preprocess": PREPROCESS}]
    else:
        models = [{"name": m, "weights": "pretrained"} for m in ("efficientnet_lite0", "mobilenet_v2_tv")]
    targets = args.targets.split(",")[:1] if args.smoke else args.targets.split(",")
    plan = {
        "name": "label-free",
        "dataset": f"images:{evals}",
        "calibration": {"num_images": calib_images, "data": f"images:{calib}"},
        "models": models,
        "targets": targets,
        "bench": {"enabled": False},  # latency is not this benchmark's subject
        # A release-style gate (at most 5 points of disagreement) and two looser ones near what int8 reaches on
        # these out-of-distribution photos, where the interval and the images to settle matter.
        "gates": [
            {"metric": "agreement_top1", "max_drop_points": 5},
            {"metric": "agreement_top1", "min": 0.7},
            {"metric": "mean_l1", "max": 0.5},
        ],
    }
    (out / "plan.yaml").write_text(yaml.safe_dump(plan))
    code = cli(["signoff", str(out / "plan.yaml"), "--out", str(out / "run")])
    if not (out / "run" / "verdicts.jsonl").is_file():
        return code  # the sign-off did not get to its verdicts: an error, said above
    rows = [json.loads(line) for line in (out / "run" / "verdicts.jsonl").read_text().splitlines()]
    print(f"\n{images} images (photos + crops, no labels); targets: {', '.join(targets)}")
    for v in rows:
        print(
            f"{v['model']:<20} {v['target']:<18} {v['gate']:<42} value {v['value']:+.4f} "
            f"[{v['ci_low']:+.4f}, {v['ci_high']:+.4f}] {v['unit']:<8} {v['verdict']}"
            + (" (underpowered)" if v.get("underpowered") else "")
            + (f", {v['images_to_settle']} images to settle" if v.get("images_to_settle") else "")
        )
    # The verdicts are the figures (a FAIL included): the benchmark ran.
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
