"""int8 fidelity of quantship's post-training steps against the anchors, on real pretrained weights.

For EfficientNet-Lite0 and MobileNetV2 (torchvision's weights), on the same calibration images and the same
evaluation images (scikit-image photos and seeded crops/flips of them; calibration crops come from other
photos), each int8 model's top-1 agreement with the fp32 Keras model and the mean L1 distance of their
probability vectors:

* anchors: TFLite's converter int8 (its own calibration); ONNX Runtime ``quant_pre_process`` +
  ``quantize_static`` (QDQ, MinMax, per-channel weights, Softmax left in float) run with Q/DQ fusion disabled;
  NVIDIA ModelOpt's ONNX PTQ (max and entropy, fp32 high precision) when its separate environment exists
  (``--modelopt-python``), run the same way;
* ours: TFLite int8 from the converter with the post-training steps (equalized / bias-corrected / AdaRounded
  Keras model through the converter's own calibration), ``tflite-int8-<method>`` and the Q/DQ model (fake-quant)
  per method, each without and with the steps; ``--steps ...,adaround,auto`` adds AdaRound (budget:
  ``--adaround-iterations``, ``--adaround-images``) and ``--post-training auto`` (each target's steps chosen on
  held-out calibration images; the row names the choice, ``<target> [auto: <steps>]``).

Each row's difference to the best anchor (per figure) comes with a 95 % paired interval: exact for agreement
(``paired_diff_interval`` on the per-image 0/1 agreement), percentile bootstrap over images for mean L1.
The crops of one photo are correlated, so both intervals are narrower than they would be on independent images.

    python benchmarks/int8_fidelity.py                     # both models, 500 evaluation images (~40 min, 2 cores)
    python benchmarks/int8_fidelity.py --models mobilenet_v2_tv --steps none,equalize+bias-correct
    python benchmarks/int8_fidelity.py --smoke             # tiny random model, 6 images, 2 methods: runs in seconds

Outputs are cached per (model, steps, target) under --out, so a rerun only computes what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = ("max", "entropy", "percentile", "mse", "auto")
STEPS = {
    "none": dict(),
    "equalize": dict(equalize=True),
    "bias-correct": dict(bias_correct=True),
    "equalize+bias-correct": dict(equalize=True, bias_correct=True),
    "equalize-calibration": dict(equalize=True, relu6="calibration"),
    "equalize-calibration+bias-correct": dict(equalize=True, bias_correct=True, relu6="calibration"),
    "equalize-relu": dict(equalize=True, relu6="relu"),
    "equalize-relu+bias-correct": dict(equalize=True, bias_correct=True, relu6="relu"),
    "adaround": dict(adaround=True),  # AdaRound at --adaround-iterations / --adaround-images
    "auto": dict(auto=True),  # --post-training auto: each target's steps chosen on held-out calibration images
}
ADAROUND: dict = {}  # AdaRoundOptions fields from the command line (none: the package's default budget)


def ptq_steps(steps: str):
    from quantship.config import AdaRoundOptions, PtqSteps

    fields = dict(STEPS[steps])
    if fields.pop("adaround", False):
        fields["adaround"] = AdaRoundOptions(**ADAROUND)
    return PtqSteps(**fields)


ORT_ANCHOR = "ort-quantize_static-minmax"


def load_inputs(model: str, data_root: Path, workers: int):
    """The model (its pretrained weights; a model file: the smoke model), its calibration data (CalibrationData)
    and the preprocessed evaluation images."""
    from smoke import load

    from quantship.data.datasets import iter_batches, load_dataset
    from quantship.targets.run import calibration_data

    loaded = load(model, "pretrained")
    calib = calibration_data(load_dataset(f"imagenet:{data_root / 'calib'}"), loaded, workers=workers)
    xs, keys = [], []
    for b in iter_batches(load_dataset(f"imagenet:{data_root / 'eval'}"), loaded.preprocess, 32, workers):
        xs.append(b.inputs[:, 0])
        keys += list(b.keys)
    return loaded, calib, np.concatenate(xs), keys


def cached(path: Path, compute) -> np.ndarray:
    if path.is_file():
        return np.load(path)
    out = np.asarray(compute(), np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out


def our_targets(loaded, calib, x, steps: str, targets: list[str], out: Path, threads: int) -> dict[str, np.ndarray]:
    """Each target's outputs on ``x``, built with the post-training ``steps`` (``auto``: chosen per target by the
    search, whose record goes to ``outputs/<target>.search.json``)."""
    from quantship.evaluate.loop import runner_outputs
    from quantship.runtime.base import RunnerOptions
    from quantship.targets import BuildContext, get_target
    from quantship.targets.post_training import build_searched

    ctx = BuildContext(
        loaded,
        out / steps,
        calibration=calib,
        runner_options=RunnerOptions(threads=threads),
        log_path=out / steps / "convert.log",
        ptq=ptq_steps(steps),
    )
    results = {}
    try:
        for name in targets:
            target = get_target(name)

            def compute(target=target, name=name):
                t0 = time.perf_counter()
                artifact = build_searched(ctx, target)
                search = artifact.manifest.get("post_training_search") if artifact is not None else None
                if search is not None:
                    (out / steps / "outputs").mkdir(parents=True, exist_ok=True)
                    (out / steps / "outputs" / f"{name}.search.json").write_text(json.dumps(search, indent=1))
                with target.make_runner(ctx, artifact) as r:
                    y = runner_outputs(r, x)
                print(f"    {loaded.name} {steps:28s} {name:24s} {time.perf_counter() - t0:6.0f} s", flush=True)
                return y

            results[name] = cached(out / steps / "outputs" / f"{name}.npy", compute)
    finally:
        ctx.close()
    return results


def ort_anchor(onnx_path: Path, calib_batches: list[np.ndarray], x: np.ndarray, out: Path, threads: int) -> np.ndarray:
    """ONNX Runtime's own int8: quant_pre_process, then quantize_static (QDQ, MinMax, per-channel, Softmax in
    float), run with Q/DQ fusion disabled (its fake-quant)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from quantship.evaluate.loop import runner_outputs
    from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT, OnnxRunner

    pre = out / "ort-pre.onnx"
    qdq = out / "ort-qdq.onnx"
    if not qdq.is_file():
        out.mkdir(parents=True, exist_ok=True)
        quant_pre_process(str(onnx_path), str(pre))

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter([{"input": b[i : i + 1]} for b in calib_batches for i in range(len(b))])

            def get_next(self):
                return next(self.it, None)

        ops = sorted({n.op_type for n in onnx.load(str(pre)).graph.node} - {"Softmax"})
        quantize_static(
            str(pre),
            str(qdq),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=ops,
        )
    with OnnxRunner(str(qdq), num_threads=threads, session_config=QDQ_FAKE_QUANT) as r:
        return runner_outputs(r, x)


def modelopt_anchor(
    python: str, onnx_path: Path, calib_batches: list[np.ndarray], x: np.ndarray, method: str, out: Path, threads: int
) -> np.ndarray | None:
    """NVIDIA ModelOpt's ONNX PTQ (int8, fp32 high precision) in its own environment, run with Q/DQ fusion
    disabled. None when that environment cannot run it."""
    from quantship.evaluate.loop import runner_outputs
    from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT, OnnxRunner

    qdq = out / f"modelopt-{method}.onnx"
    if not qdq.is_file():
        out.mkdir(parents=True, exist_ok=True)
        calib = out / "modelopt-calib.npy"
        np.save(calib, np.concatenate(calib_batches))
        cmd = [
            python,
            "-m",
            "modelopt.onnx.quantization",
            "--onnx_path",
            str(onnx_path),
            "--quantize_mode",
            "int8",
            "--calibration_data_path",
            str(calib),
            "--calibration_eps",
            "cpu",
            "--calibration_method",
            method,
            "--high_precision_dtype",
            "fp32",
            "--output_path",
            str(qdq),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        (out / f"modelopt-{method}.log").write_text(res.stdout + res.stderr)
        if res.returncode != 0 or not qdq.is_file():
            print(f"    ModelOpt {method} failed (log: {out / f'modelopt-{method}.log'})", flush=True)
            return None
    with OnnxRunner(str(qdq), num_threads=threads, session_config=QDQ_FAKE_QUANT) as r:
        return runner_outputs(r, x)


def figures(y: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image top-1 agreement (0/1) and L1 distance of the probability vectors."""
    return (y.argmax(1) == ref.argmax(1)).astype(np.float64), np.abs(y - ref).sum(1)


def bootstrap_diff_ci(
    target: np.ndarray, reference: np.ndarray, samples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of mean(target) - mean(reference), resampling images (paired: the same
    images for both). (``quantship.evaluate.stats``, which this script imported, was deleted before it was
    committed: the sign-off's intervals are exact and need no such helper.)"""
    diff = np.asarray(target, np.float64) - np.asarray(reference, np.float64)
    idx = np.random.default_rng(seed).integers(0, diff.size, size=(samples, diff.size))
    means = diff[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def compare(rows: dict[str, np.ndarray], ref: np.ndarray, anchors: list[str]) -> list[dict]:
    from quantship.evaluate.intervals import paired_counts, paired_diff_interval

    figs = {name: figures(y, ref) for name, y in rows.items()}
    best_agree = max(anchors, key=lambda a: figs[a][0].mean())
    best_l1 = min(anchors, key=lambda a: figs[a][1].mean())
    out = []
    for name, (agree, l1) in figs.items():
        b, c, _, _ = paired_counts(agree.astype(bool), figs[best_agree][0].astype(bool))
        lo, hi = paired_diff_interval(b, c, len(agree))
        llo, lhi = bootstrap_diff_ci(l1, figs[best_l1][1], samples=2000)
        out.append(
            {
                "variant": name,
                "anchor": name in anchors,
                "agreement": float(agree.mean()),
                "mean_l1": float(l1.mean()),
                "best_anchor_agreement": best_agree,
                "d_agreement": float(agree.mean() - figs[best_agree][0].mean()),
                "d_agreement_ci": [lo, hi],
                "best_anchor_l1": best_l1,
                "d_l1": float(l1.mean() - figs[best_l1][1].mean()),
                "d_l1_ci": [llo, lhi],
            }
        )
    return out


def markdown(model: str, n: int, rows: list[dict]) -> str:
    lines = [
        f"**{model}** ({n} evaluation images; Δ to the best anchor, 95 % paired interval)",
        "",
        "| variant | agreement | Δ agreement [interval] | mean L1 | Δ L1 [interval] |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        a_lo, a_hi = r["d_agreement_ci"]
        l_lo, l_hi = r["d_l1_ci"]
        lines.append(
            f"| {'*' if r['anchor'] else ''}{r['variant']} | {r['agreement']:.3f} | {r['d_agreement']:+.3f} "
            f"[{a_lo:+.3f}, {a_hi:+.3f}] | {r['mean_l1']:.3f} | {r['d_l1']:+.3f} [{l_lo:+.3f}, {l_hi:+.3f}] |"
        )
    return "\n".join(lines)


def _chosen(search_json: Path) -> str:
    """``: <steps>`` for a target whose steps the search chose (``: <calibrator> <steps>`` when it chose the
    calibrator too)."""
    if not search_json.is_file():
        return ""
    search = json.loads(search_json.read_text())
    calibrator = search.get("chosen_calibrator")
    return f": {calibrator + ' ' if calibrator else ''}{search['chosen']}"


def main(argv: list[str] | None = None) -> int:
    from photos import write_photo_sets

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="efficientnet_lite0,mobilenet_v2_tv")
    p.add_argument("--eval-images", type=int, default=500)
    p.add_argument("--calib-images", type=int, default=100)
    p.add_argument("--steps", default="none,equalize,bias-correct,equalize+bias-correct")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument(
        "--modelopt-python",
        help="python of a separate environment with nvidia-modelopt (it pins its own onnx/onnxruntime); "
        "without it the ModelOpt anchors are left out",
    )
    p.add_argument("--adaround-iterations", type=int, help="AdaRound steps per layer (default: the package's)")
    p.add_argument("--adaround-images", type=int, help="AdaRound calibration images (default: the package's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="int8-fidelity-out")
    p.add_argument(
        "--smoke", action="store_true", help="tiny random model, 6 images, 2 methods: checks the script runs (seconds)"
    )
    args = p.parse_args(argv)
    if args.smoke:
        from smoke import tiny_model

        args.models = tiny_model(Path(args.out))
        args.eval_images, args.calib_images, args.methods = 6, 8, "max,entropy"
        args.steps, args.adaround_iterations = "none,bias-correct,adaround,auto", args.adaround_iterations or 20
    for key in ("iterations", "images"):
        if getattr(args, f"adaround_{key}") is not None:
            ADAROUND[key] = getattr(args, f"adaround_{key}")
    if args.modelopt_python is not None and not Path(args.modelopt_python).is_file():
        p.error(f"--modelopt-python: {args.modelopt_python} is not a file")
    out = Path(args.out)
    data = out / "photos"
    write_photo_sets(data, args.eval_images, args.calib_images)
    methods = [m for m in args.methods.split(",") if m]
    report = {}
    for model in [m for m in args.models.split(",") if m]:
        t0 = time.perf_counter()
        loaded, calib, x, keys = load_inputs(model, data, args.workers)
        mout = out / loaded.name
        ref = cached(
            mout / "fp32.npy",
            lambda: np.concatenate(
                [np.asarray(loaded.model(x[i : i + 32], training=False)) for i in range(0, len(x), 32)]
            ),
        )
        print(f"{model}: {len(x)} evaluation images, {calib.info['num_images']} calibration images", flush=True)
        rows: dict[str, np.ndarray] = {}
        anchors: list[str] = []
        # The anchors first. The float ONNX export every Q/DQ anchor quantizes is the plain model's.
        base = our_targets(loaded, calib, x, "none", ["tflite-int8", "onnx-fp32"], mout, args.threads)
        rows["tflite converter int8"] = base["tflite-int8"]
        anchors.append("tflite converter int8")
        onnx_fp32 = mout / "none" / "artifacts" / f"{loaded.name}-onnx-fp32.onnx"
        rows[ORT_ANCHOR] = cached(
            mout / "anchors" / "ort.npy",
            lambda: ort_anchor(onnx_fp32, calib.batches(), x, mout / "anchors", args.threads),
        )
        anchors.append(ORT_ANCHOR)
        if args.modelopt_python is None:
            print("ModelOpt anchors left out: no --modelopt-python given", flush=True)
        else:
            for method in ("max", "entropy"):
                path = mout / "anchors" / f"modelopt-{method}.npy"
                y = (
                    np.load(path)
                    if path.is_file()
                    else modelopt_anchor(
                        args.modelopt_python, onnx_fp32, calib.batches(), x, method, mout / "anchors", args.threads
                    )
                )
                if y is not None:
                    np.save(path, y)
                    rows[f"modelopt {method}"] = y
                    anchors.append(f"modelopt {method}")
        for steps in [s for s in args.steps.split(",") if s]:
            targets = ["tflite-int8"] + [f"tflite-int8-{m}" for m in methods] + [f"qdq-int8-{m}" for m in methods]
            ys = our_targets(loaded, calib, x, steps, targets, mout, args.threads)
            for name, y in ys.items():
                if not (steps == "none" and name == "tflite-int8"):  # that one is the converter's anchor
                    rows[f"{name} [{steps}{_chosen(mout / steps / 'outputs' / f'{name}.search.json')}]"] = y
        table = compare(rows, ref, anchors)
        report[loaded.name] = {"images": len(x), "calibration_images": calib.info["num_images"], "rows": table}
        print(markdown(loaded.name, len(x), table), flush=True)
        print(f"{model}: {time.perf_counter() - t0:.0f} s", flush=True)
    (out / "int8_fidelity.json").write_text(json.dumps(report, indent=1))
    (out / "int8_fidelity.md").write_text(
        "\n\n".join(markdown(m, r["images"], r["rows"]) for m, r in report.items()) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
