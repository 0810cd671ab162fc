"""Every bad input gets one clear error, or a correct result (issue 14): one table, one row per case.

Each row builds its input in a temporary folder, runs the exact command, and checks the exit code, a fragment of
the message (for exit code 2: the only line on stderr, no traceback) and what ``--out`` holds afterwards: nothing for
a case refused before any work; for a case that skips and continues, or records a failure in a row, exactly the
files and rows it should have, no temporary file left, every file with the permissions of the user's umask.

Cases refused before any heavy work run as subprocesses, which also check that no heavy library (TensorFlow, Keras,
ONNX Runtime, TensorRT, LiteRT) was imported. The others call the CLI's ``main()`` in-process (it must put file
descriptor 2 and ``sys.stderr`` back when it returns) and share one tiny model trained once per session.
Add a row whenever an option is added.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from conftest import CLASSES, TINY_PREPROCESS, encode, synthetic_image, write_synset_dataset

HEAVY = ("tensorflow", "keras", "onnxruntime", "tensorrt", "ai_edge_litert", "tf2onnx")
NOTHING = frozenset()  # --out absent or empty afterwards
# Written when a library has something to say, and the lock file a job holds on its folder (left, unlocked, by a
# job that ran): not part of the contract. A run refused before any work leaves neither.
LOGS = {"native.log", "convert.log", ".quantship.lock"}


@dataclass(frozen=True)
class Case:
    """One row: how the input is built, the command, what must come out.

    Attributes:
        build: ``build(tmp, env) -> placeholders`` writes the input under ``tmp`` (``env`` holds the shared
            models and data) and returns extra ``{name}`` values for ``argv``.
        argv: The command after ``quantship``, with ``{out}``, ``{tmp}``, ``{model}``, ``{data}``... placeholders.
        inprocess: Run through ``main()`` in this process (needs a model); else a subprocess.
        code: Expected exit code.
        message: A fragment the message must contain.
        out: The names ``--out`` holds afterwards (logs aside); :data:`NOTHING` for none.
        check: More checks on the output folder (rows, file contents).
        env: Environment variables of the run (subprocess rows).
    """

    id: str
    argv: tuple[str, ...]
    code: int
    message: str
    out: frozenset[str] = NOTHING
    build: Callable[[Path, dict], dict] = lambda tmp, env: {}
    inprocess: bool = False
    check: Callable[[Path], None] | None = None
    env: tuple[tuple[str, str], ...] = ()


def bench_argv(*extra: str) -> tuple[str, ...]:
    """``quantship bench`` of the two files :func:`two_tflite` writes, with ``extra`` options."""
    return ("bench", "--artifact", "{tmp}/a-fp32.tflite", "--artifact", "{tmp}/b-int8.tflite", "--out", "{out}", *extra)


def two_tflite(tmp: Path, env: dict) -> dict:
    """Two files named like LiteRT models that no interpreter can load (never read by a refused command)."""
    for name in ("a-fp32.tflite", "b-int8.tflite"):
        (tmp / name).write_bytes(b"not a flatbuffer")
    return {}


def eval_argv(*extra: str, data: str = "imagenet:{data}", targets: str = "keras-fp32") -> tuple[str, ...]:
    """``quantship eval`` of the tiny model on ``data`` with ``extra`` options (later options win)."""
    base = ("eval", "--model", "{model}", "--preprocess", TINY_PREPROCESS, "--data", data)
    return (*base, "--targets", targets, "--calib-images", "2", "--out", "{out}", "-q", *extra)


# ------------------------------------------------------------------------------------------------ inputs


def _flat(tmp: Path, gt: bytes, names: tuple[str, ...] = ("a.JPEG", "b.JPEG")) -> Path:
    """A flat folder of JPEGs with a ``val.txt`` ground truth given as raw bytes."""
    folder = tmp / "flat"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        (folder / name).write_bytes(encode(synthetic_image(i % 3, rng)))
    (folder / "val.txt").write_bytes(gt)
    return folder


def flat(gt: bytes, names: tuple[str, ...] = ("a.JPEG", "b.JPEG")) -> Callable[[Path, dict], dict]:
    return lambda tmp, env: {"flat": str(_flat(tmp, gt, names))}


def with_bad_image(name: str, data: Callable[[], bytes]) -> Callable[[Path, dict], dict]:
    """The shared 6-image dataset plus one bad image."""

    def build(tmp: Path, env: dict) -> dict:
        root = shutil.copytree(env["data"], tmp / "data")
        (root / CLASSES[0] / name).write_bytes(data())
        return {"data": str(root)}

    return build


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with a few bytes of pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_cut_in_half() -> bytes:
    """A JPEG cut in half with an end-of-image marker appended: decodes with grey pixels and a libjpeg warning."""
    data = encode(synthetic_image(0, np.random.default_rng(5), size=96))
    return data[: len(data) // 2] + b"\xff\xd9"


def all_unreadable(tmp: Path, env: dict) -> dict:
    root = tmp / "data"
    for cls in CLASSES[:2]:
        (root / cls).mkdir(parents=True)
        (root / cls / "x.JPEG").write_bytes(b"not an image at all")
    return {"data": str(root)}


class _HugeArray:
    """Pickles as numpy's ``_reconstruct`` of a (10**13,) array: terabytes if allocated."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (10**13,), b"b"))


def val224(data: Any) -> Callable[[Path, dict], dict]:
    def build(tmp: Path, env: dict) -> dict:
        path = tmp / "val224.pkl"
        path.write_bytes(pickle.dumps({"data": data, "target": [0]}, protocol=2))
        return {"pkl": str(path)}

    return build


def voc_with_list(listing: bytes) -> Callable[[Path, dict], dict]:
    def build(tmp: Path, env: dict) -> dict:
        from detection_fixtures import write_voc

        root = write_voc(tmp / "voc", 2, seed=1)
        (root / "VOC2007" / "ImageSets" / "Main" / "test.txt").write_bytes(listing)
        return {"voc": str(root)}

    return build


def coco(edit: Callable[[dict, Path], Any] = lambda doc, root: None, raw: str | None = None):
    """Generated COCO data whose annotation JSON ``edit`` changes (or replaces with ``raw`` text)."""

    def build(tmp: Path, env: dict) -> dict:
        from detection_fixtures import write_coco

        root = write_coco(tmp / "coco", 3, seed=2)
        ann = root / "annotations" / "instances_val2017.json"
        doc = json.loads(ann.read_text())
        edit(doc, root)
        ann.write_text(raw if raw is not None else json.dumps(doc))
        return {"coco": str(root)}

    return build


def coco_symlinked_with_corrupt_image(tmp: Path, env: dict) -> dict:
    """COCO whose val2017 is a symlink to a folder elsewhere (allowed), with one corrupt image."""
    from detection_fixtures import write_coco

    root = write_coco(tmp / "coco", 4, seed=3)
    elsewhere = tmp / "mnt" / "val2017"
    elsewhere.parent.mkdir()
    shutil.move(root / "val2017", elsewhere)
    (root / "val2017").symlink_to(elsewhere, target_is_directory=True)
    victim = sorted(elsewhere.glob("*.jpg"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] + b"\xff\xd9")
    return {"coco": str(root), "victim": victim.name}


def _traverse(doc: dict, root: Path) -> None:
    doc["images"][1]["file_name"] = "../../secret.jpg"


def plan(edit: dict | None = None, drop: tuple[str, ...] = (), raw: bytes | None = None):
    """A sign-off plan: the tiny model, its preprocessing as the CLI string, one target, one gate, with ``edit``
    applied to the top level (or the raw bytes given)."""

    def build(tmp: Path, env: dict) -> dict:
        import yaml

        doc = {
            "name": "bad",
            "dataset": f"imagenet:{env['data']}",
            "models": [{"name": str(env["model"]), "preprocess": TINY_PREPROCESS}],
            "targets": ["tflite-fp32"],
            "gates": [{"metric": "top1", "relative": 0.9}],
            "bench": False,
        }
        for key, value in (edit or {}).items():
            doc[key] = value(doc) if callable(value) else value
        for key in drop:
            doc.pop(key)
        path = tmp / "plan.yaml"
        path.write_bytes(raw if raw is not None else yaml.safe_dump(doc).encode())
        return {"plan": str(path)}

    return build


class model_edit:  # noqa: N801 - reads as a function in the table
    """The plan's model with some keys changed (its repr names the change, for the row's id)."""

    def __init__(self, **change: Any):
        self.change = change

    def __call__(self, doc: dict) -> list:
        return [{**doc["models"][0], **self.change}]

    def __repr__(self) -> str:
        return ",".join(f"{k}={v!r}" for k, v in self.change.items())


def results_folder(env_text: str | None = None, verdict: dict | None = None, drop: tuple[str, ...] = ()):
    """A results folder as eval / sign-off leave it, with a corrupt environment.json, a broken verdict row or a
    result row without the keys ``drop``."""

    def build(tmp: Path, env: dict) -> dict:
        folder = tmp / "results"
        folder.mkdir()
        row = {"model": "tiny", "target": "keras-fp32", "task": "classification", "images": 6, "top1": 0.5}
        row = {k: v for k, v in row.items() if k not in drop}
        (folder / "results.jsonl").write_text(json.dumps(row) + "\n")
        if env_text is not None:
            (folder / "environment.json").write_text(env_text)
        if verdict is not None:
            (folder / "verdicts.jsonl").write_text(json.dumps(verdict) + "\n")
        return {"results": str(folder)}

    return build


def savedmodel_folder(tmp: Path, env: dict) -> dict:
    """A folder that looks like a SavedModel (refused before it is read)."""
    folder = tmp / "sm"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(b"\x08\x01")
    return {"sm": str(folder)}


def stale_temp_files(tmp: Path, env: dict) -> dict:
    """An output folder with what a killed run leaves (process 999999999 does not exist) and a file of the user's."""
    out = tmp / "out"
    (out / ".quantship-tmp" / "savedmodel-999999999-abc" / "model").mkdir(parents=True)
    (out / "artifacts").mkdir()
    (out / "artifacts" / ".tiny-tflite-fp32.tflite.999999999-x1y2.tmp").write_bytes(b"half")
    (out / ".report_chart.png.999999999-q9w8.tmp").write_bytes(b"half")
    (out / "keep.txt").write_text("mine")
    return {}


def garbage_onnx(tmp: Path, env: dict) -> dict:
    (tmp / "garbage.onnx").write_bytes(b"\x00garbage" * 10)
    return {}


def out_is_a_file(tmp: Path, env: dict) -> dict:
    (tmp / "out").write_text("a file where the results folder should be")
    return {}


def parent_is_a_file(tmp: Path, env: dict) -> dict:
    (tmp / "file").write_text("x")
    return {"out": str(tmp / "file" / "sub")}


# ------------------------------------------------------------------------------- inputs of issue 26's rows


def copied_data(tmp: Path, env: dict) -> Path:
    return shutil.copytree(env["data"], tmp / "data")


def out_inside_data(tmp: Path, env: dict) -> dict:
    root = copied_data(tmp, env)
    return {"data": str(root), "out": str(root / CLASSES[0] / "results")}


def out_inside_calib_data(tmp: Path, env: dict) -> dict:
    cal = write_synset_dataset(tmp / "cal", 1, seed=21)
    return {"cal": str(cal), "out": str(cal / "results")}


def calib_with_unreadable(tmp: Path, env: dict) -> dict:
    """Four calibration images, one of them not an image."""
    cal = tmp / "cal"
    cal.mkdir()
    rng = np.random.default_rng(4)
    for i in range(3):
        (cal / f"c{i}.JPEG").write_bytes(encode(synthetic_image(i, rng)))
    (cal / "bad.JPEG").write_bytes(b"not an image")
    return {"cal": str(cal)}


def listing_with_bom(tmp: Path, env: dict) -> dict:
    """A calibration list as a Windows editor saves it: a UTF-8 byte-order mark before the first name."""
    root = copied_data(tmp, env)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.JPEG"))[:2]
    (tmp / "list.txt").write_bytes(b"\xef\xbb\xbf" + "".join(f"{n}\n" for n in names).encode())
    return {"data": str(root), "list": str(tmp / "list.txt")}


def filled_cache(tmp: Path, env: dict) -> tuple[Path, Path]:
    """A copy of the shared data and an input cache filled with it under the tiny model's preprocessing: (data
    folder, the cache entry's folder)."""
    from quantship.config import PreprocessSpec, parse_preprocess_overrides
    from quantship.data.cache import InputCache
    from quantship.data.datasets import iter_batches, load_dataset

    root = copied_data(tmp, env)
    spec = PreprocessSpec().with_overrides(**parse_preprocess_overrides(TINY_PREPROCESS))
    cache = InputCache(tmp / "cache", 10**9)
    for _ in iter_batches(load_dataset(f"imagenet:{root}"), spec, 4, 1, cache=cache):
        pass
    cache.close()
    (entry,) = (tmp / "cache").iterdir()
    return root, entry


def cache_with_empty_shard(tmp: Path, env: dict) -> dict:
    """What a full disk or a crash leaves: a zero-byte shard file with its index."""
    root, entry = filled_cache(tmp, env)
    shards = list(entry.glob("shard-*.npy"))
    assert shards
    for shard in shards:
        shard.write_bytes(b"")
    return {"data": str(root), "cache": str(tmp / "cache")}


def cache_with_stale_temporary(tmp: Path, env: dict) -> dict:
    """A cache entry with the temporary a fill killed while writing its index leaves (process 999999999)."""
    root, entry = filled_cache(tmp, env)
    (entry / ".entry.json.999999999-ab12.tmp").write_bytes(b"half")
    return {"data": str(root), "cache": str(tmp / "cache")}


def cache_holds(out: Path) -> None:
    cache = out.parent / "cache"
    shards = list(cache.rglob("shard-*.npy"))
    assert shards and all(p.stat().st_size > 0 for p in shards), [(p.name, p.stat().st_size) for p in shards]
    assert not list(cache.rglob(".entry.json.*.tmp")), "the dead process's temporary is still there"


def two_output_model(tmp: Path, env: dict) -> dict:
    import keras

    inputs = keras.Input((32, 32, 3), name="input")
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    path = tmp / "two.keras"
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x)).save(path)
    return {"model": str(path)}


def progressive_jpeg_cut_in_half() -> bytes:
    """A progressive JPEG cut in half with an end marker: decodes as its earlier, coarser scans (no grey)."""
    import cv2

    img = synthetic_image(0, np.random.default_rng(5), size=96)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok
    data = buf.tobytes()
    return data[: len(data) // 2] + b"\xff\xd9"


def dangling_symlink(tmp: Path, env: dict) -> dict:
    root = copied_data(tmp, env)
    (root / CLASSES[0] / "gone.JPEG").symlink_to(tmp / "unmounted" / "gone.JPEG")
    return {"data": str(root)}


def target_failed(target: str, fragment: str) -> Callable[[Path], None]:
    def check(out: Path) -> None:
        got = {r["target"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
        assert got[target]["status"] == "failed" and fragment in got[target]["error"], got[target]

    return check


# ------------------------------------------------------------------------------------------------ checks


def rows(name: str = "results.jsonl", **expected: Any) -> Callable[[Path], list[dict]]:
    """Check that every row of ``name`` has the ``expected`` values."""

    def check(out: Path) -> None:
        got = [json.loads(line) for line in (out / name).read_text().splitlines()]
        assert got, f"{name} holds no row"
        for r in got:
            for key, value in expected.items():
                assert r.get(key) == value, (key, r.get(key), value)

    return check


def skipped_holds(fragment: str, *more: str) -> Callable[[Path], None]:
    def check(out: Path) -> None:
        text = (out / "skipped.txt").read_text()
        for f in (fragment, *more):
            assert f in text, text

    return check


def both(*checks: Callable[[Path], None]) -> Callable[[Path], None]:
    def check(out: Path) -> None:
        for c in checks:
            c(out)

    return check


def signoff_ran(out: Path) -> None:
    got = [json.loads(line) for line in (out / "signoff.jsonl").read_text().splitlines()]
    assert sorted(r["target"] for r in got) == ["keras-fp32", "tflite-fp32"]
    verdicts = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert [v["target"] for v in verdicts] == ["tflite-fp32"] and verdicts[0]["passed"]
    assert json.loads((out / "plan.json").read_text())["models"][0]["preprocess"]["size"] == [32, 32]


# ------------------------------------------------------------------------------------------------- table

P = TINY_PREPROCESS
EVAL_OUT = frozenset({"results.jsonl", "results.md"})
CASES = [
    # --- ground truth, data lists and pickles that are not what they claim
    Case(
        "gt-not-utf8",
        eval_argv(data="imagenet:{flat}"),
        2,
        "val.txt:2: not UTF-8",
        build=flat(b"a.JPEG 0\nb.JPEG caf\xe9\n"),
    ),
    Case(
        "gt-one-file-two-labels",
        eval_argv(data="imagenet:{flat}"),
        2,
        "a.JPEG has two different labels, 0 (line 1) and 2 (line 3)",
        build=flat(b"a.JPEG 0\nb.JPEG 1\na.JPEG 2\n"),
    ),
    Case(
        "gt-lists-absent-files",
        eval_argv(data="imagenet:{flat}"),
        2,
        "lists 2 file(s) that are not in",
        build=flat(b"a.JPEG 0\nb.JPEG 1\nc.JPEG 1\nd.JPEG 2\n"),
    ),
    Case(
        "gt-lists-absent-files-allowed",
        eval_argv("--allow-missing-images", data="imagenet:{flat}"),
        0,
        "2 image(s) listed in the ground truth are missing",
        EVAL_OUT,
        flat(b"a.JPEG 0\nb.JPEG 1\nc.JPEG 1\nd.JPEG 2\n"),
        inprocess=True,
        check=rows(missing_images=2, images=2),
    ),
    Case(
        "voc-list-not-utf8",
        eval_argv(data="voc2007:{voc}"),
        2,
        "test.txt:2: not UTF-8",
        build=voc_with_list(b"000000\n00000\xe9\n"),
    ),
    Case("val224-data-huge-int", eval_argv(data="imagenet:{pkl}"), 2, "'data' must be a list", build=val224(10**11)),
    Case("val224-data-negative", eval_argv(data="imagenet:{pkl}"), 2, "'data' must be a list", build=val224(-1)),
    Case("val224-data-none", eval_argv(data="imagenet:{pkl}"), 2, "'data' must be a list", build=val224(None)),
    Case(
        "val224-array-of-10**13",
        eval_argv(data="imagenet:{pkl}"),
        2,
        "larger than its file",
        build=val224([_HugeArray()]),
    ),
    Case(
        "coco-top-level-list",
        eval_argv(data="coco:{coco}"),
        2,
        "the top level must be an object",
        build=coco(raw="[]"),
    ),
    Case(
        "coco-no-annotations",
        eval_argv(data="coco:{coco}"),
        2,
        "'annotations' is empty",
        build=coco(lambda doc, root: doc.update(annotations=[])),
    ),
    Case(
        "coco-duplicate-image-id",
        eval_argv(data="coco:{coco}"),
        2,
        "images[0] and images[1] have the same id 1000",
        build=coco(lambda doc, root: doc["images"][1].update(id=1000)),
    ),
    Case(
        "coco-file-name-outside",
        eval_argv(data="coco:{coco}"),
        2,
        "file_name '../../secret.jpg' points outside",
        build=coco(_traverse),
    ),
    # --- images: skipped and listed, the run goes on; none readable: refused
    Case(
        "png-claiming-50000x50000",
        eval_argv(),
        0,
        "1 unreadable skipped",
        EVAL_OUT | {"skipped.txt"},
        with_bad_image("huge.png", lambda: png_claiming(50000, 50000)),
        inprocess=True,
        check=both(rows(images=6, skipped=1), skipped_holds("huge.png", "50000x50000 pixels")),
    ),
    Case(
        "jpeg-cut-in-half-with-end-marker",
        eval_argv(),
        0,
        "1 unreadable skipped",
        EVAL_OUT | {"skipped.txt"},
        with_bad_image("cut.JPEG", jpeg_cut_in_half),
        inprocess=True,
        check=both(rows(images=6, skipped=1), skipped_holds("cut.JPEG", "corrupt JPEG")),
    ),
    Case(
        "every-image-unreadable",
        eval_argv(),
        2,
        "none of the 2 evaluation images could be read",
        frozenset({"skipped.txt"}),
        all_unreadable,
        inprocess=True,
    ),
    Case(
        "detection-skipped-listed-symlinked-folder",
        (
            "eval",
            "--model",
            "{detector}",
            "--preprocess",
            "mode=tf,size=64,crop_pct=1.0,resize=stretch",
            "--anchors",
            "{anchors}",
            "--data",
            "coco:{coco}",
            "--targets",
            "keras-fp32",
            "--out",
            "{out}",
            "-q",
        ),
        0,
        "1 unreadable skipped (skipped.txt)",
        EVAL_OUT | {"skipped.txt"},
        coco_symlinked_with_corrupt_image,
        inprocess=True,
        check=both(rows(images=3, skipped=1, task="detection"), skipped_holds("corrupt JPEG")),
    ),
    # --- outputs that are not numbers
    Case(
        "nan-weights",
        eval_argv(),
        1,
        "NaN or inf outputs on some images (scored as wrong) from: nan keras-fp32 (6 of 6)",
        EVAL_OUT,
        lambda tmp, env: {"model": str(env["nan_model"])},
        inprocess=True,
        check=rows(nonfinite_images=6, top1=0.0, top5=0.0),
    ),
    Case(
        "overflowing-weights",
        eval_argv(),
        1,
        "inf keras-fp32 (6 of 6)",
        EVAL_OUT,
        lambda tmp, env: {"model": str(env["inf_model"])},
        inprocess=True,
        check=rows(nonfinite_images=6, top1=0.0),
    ),
    Case(
        "nan-weights-allowed",
        eval_argv("--allow-nonfinite"),
        0,
        "keras-fp32",
        EVAL_OUT,
        lambda tmp, env: {"model": str(env["nan_model"])},
        inprocess=True,
        check=rows(nonfinite_images=6, top1=0.0),
    ),
    # --- preprocessing overrides
    *(
        Case(f"preprocess-{text}", eval_argv("--preprocess", text), 2, fragment)
        for text, fragment in (
            ("size=", "--preprocess expects key=value pairs separated by commas, got 'size='"),
            ("size=abc", "--preprocess size must be N or HxW, got 'abc'"),
            ("size=0", "size must be two integers in 1..8192"),
            ("size=100000", "size must be two integers in 1..8192"),
            ("mode=foo", "unknown normalisation mode 'foo'"),
            ("crop_pct=2", "crop_pct must be in [0.1, 1.0]"),
            ("crop_pct=x", "crop_pct must be a number, got 'x'"),
            ("mean=1/2", "mean expects one or three numbers"),
            ("mean=nan", "mean and std must be finite numbers"),
            ("std=1e-30", "std must be at least 0.001"),
            ("std=inf", "mean and std must be finite numbers"),
            ("interpolation=cubicle", "unknown interpolation 'cubicle'"),
            ("colour=red", "unknown preprocessing option(s): colour"),
        )
    ),
    # --- options
    Case("models-live-and-no-stats", ("models", "--live-stats", "--no-stats"), 2, "not allowed with argument"),
    Case("models-live-stats-value", ("models", "--live-stats=yes"), 2, "ignored explicit argument 'yes'"),
    Case("models-unknown-option", ("models", "--stats"), 2, "unrecognized arguments: --stats"),
    Case("targets-empty", eval_argv(targets=""), 2, "--targets: no target given"),
    Case("targets-commas", eval_argv(targets=",,"), 2, "--targets: no target given"),
    Case("targets-unknown", eval_argv(targets="tflite-int3"), 2, "unknown target 'tflite-int3'"),
    Case("calib-images-negative", eval_argv("--calib-images", "-1"), 2, "argument --calib-images: expected a positive"),
    Case(
        "batch-size-0", eval_argv("--batch-size", "0"), 2, "argument --batch-size: expected a positive integer, got 0"
    ),
    Case("threads-0", eval_argv("--threads", "0"), 2, "argument --threads: expected a positive integer, got 0"),
    Case(
        "calib-percentile-101",
        eval_argv("--calib-percentile", "101"),
        2,
        "argument --calib-percentile: expected a percentile in (0, 100], got 101",
    ),
    Case("limit-0", eval_argv("--limit", "0"), 2, "argument --limit: expected a positive integer, got 0"),
    # AdaRound's budget and the post-training search
    *(
        Case(f"adaround-{opt}-{value}", eval_argv("--adaround", f"--adaround-{opt}", value), 2, fragment)
        for opt, value, fragment in (
            ("iterations", "0", "argument --adaround-iterations: expected a positive integer, got 0"),
            ("iterations", "-5", "argument --adaround-iterations: expected a positive integer, got -5"),
            ("iterations", "nan", "argument --adaround-iterations: expected a positive integer, got 'nan'"),
            ("iterations", "1e9", "argument --adaround-iterations: expected a positive integer, got '1e9'"),
            ("iterations", "1000000", "adaround iterations must be a whole number from 1 to 100000, got 1000000"),
            ("images", "", "argument --adaround-images: expected a positive integer, got ''"),
            ("images", "many", "argument --adaround-images: expected a positive integer, got 'many'"),
        )
    ),
    Case(
        "adaround-budget-without-adaround",
        eval_argv("--adaround-images", "8"),
        2,
        "--adaround-images set AdaRound's budget: add --adaround",
    ),
    Case("post-training-unknown", eval_argv("--post-training", "best"), 2, "argument --post-training: invalid choice"),
    Case(
        "post-training-auto-with-steps",
        eval_argv("--post-training", "auto", "--equalize"),
        2,
        "--post-training auto chooses the steps itself: drop --equalize",
    ),
    Case(
        "post-training-auto-few-calibration-images",
        eval_argv("--post-training", "auto", "--calib-images", "4"),
        2,
        "--calib-images must be at least 8, got 4",
    ),
    Case(
        "demo-adaround-images-0",
        ("demo", "--adaround", "--adaround-images", "0", "--out", "{out}"),
        2,
        "argument --adaround-images: expected a positive integer, got 0",
    ),
    Case(
        "demo-post-training-auto-with-adaround",
        ("demo", "--post-training", "auto", "--adaround", "--out", "{out}"),
        2,
        "--post-training auto chooses the steps itself: drop --adaround",
    ),
    Case(
        "sensitivity-adaround-iterations-without-adaround",
        (
            "sensitivity",
            "--model",
            "{model}",
            "--data",
            "imagenet:{data}",
            "--adaround-iterations",
            "9",
            "--out",
            "{out}",
        ),
        2,
        "--adaround-iterations set AdaRound's budget: add --adaround",
    ),
    Case(
        "sensitivity-has-no-post-training-auto",
        ("sensitivity", "--model", "{model}", "--data", "imagenet:{data}", "--post-training", "auto", "--out", "{out}"),
        2,
        "unrecognized arguments: --post-training auto",
    ),
    Case("missing-required-option", ("eval", "--model", "{model}", "--out", "{out}"), 2, "required: --data"),
    Case("out-is-a-file", eval_argv(), 2, "is a file, not a folder", frozenset({"<file>"}), out_is_a_file),
    Case("out-parent-is-a-file", eval_argv(), 2, "is a file, so no folder can be made there", build=parent_is_a_file),
    Case("out-under-proc", eval_argv(), 2, "cannot write there", build=lambda tmp, env: {"out": "/proc/quantship/o"}),
    Case(
        "stale-temp-files-swept",
        eval_argv(targets=","),
        2,
        "no target given",
        frozenset({"keep.txt", "artifacts"}),
        stale_temp_files,
        check=lambda out: not list((out / "artifacts").iterdir()) or pytest.fail("temp file left"),
    ),
    Case(
        "savedmodel-as-model",
        ("eval", "--model", "{sm}", "--preprocess", P, "--data", "imagenet:{data}", "--out", "{out}"),
        2,
        "a SavedModel folder is a program",
        build=savedmodel_folder,
    ),
    Case(
        "savedmodel-as-weights",
        ("eval", "--model", "mobilenet_0.25_128", "--weights", "{sm}", "--data", "imagenet:{data}")
        + ("--targets", "keras-fp32", "--out", "{out}"),
        2,
        "--weights {sm}: a SavedModel folder is a program (loading it runs the operations of its graph); pass "
        "--trust-savedmodel",
        build=savedmodel_folder,
    ),
    Case(
        "calibrate-garbage-onnx",
        ("calibrate", "--model", "{tmp}/garbage.onnx", "--preprocess", P, "--data", "imagenet:{data}")
        + ("--qdq", "{out}/q.onnx", "--out", "{out}"),
        2,
        "garbage.onnx: not a valid ONNX model",
        build=garbage_onnx,
    ),
    Case(
        "calibrate-output-is-a-folder",
        ("calibrate", "--model", "{model}", "--preprocess", P, "--data", "imagenet:{data}")
        + ("--qdq", "{tmp}", "--out", "{out}"),
        2,
        "--qdq {tmp}: is a folder; give a file name",
    ),
    Case(
        "sensitivity-recipe-without-equals",
        ("sensitivity", "--model", "{model}", "--preprocess", P, "--data", "imagenet:{data}")
        + ("--recipe", "conv1", "--out", "{out}"),
        2,
        "--recipe expects layer=kind pairs separated by commas, got 'conv1'",
    ),
    # --- remote device (issue 22): refused before any connection or heavy work
    *[
        Case(f"remote-{name}", ("bench", "--artifact", "{tmp}/m.onnx", "--out", "{out}", *extra), 2, message)
        for name, extra, message in (
            ("url-empty", ("--remote", ""), "--remote: empty URL"),
            ("url-no-scheme", ("--remote", "pi@raspberrypi"), "expected ssh://[user@]host[:port]"),
            ("url-scheme", ("--remote", "http://pi"), "unknown scheme 'http'"),
            ("url-password", ("--remote", "ssh://pi:secret@pi"), "put no password in the URL"),
            ("url-path", ("--remote", "ssh://pi/home/pi"), "has no path or query"),
            ("url-port-zero", ("--remote", "ssh://pi:0"), "port must be 1..65535"),
            ("url-port-huge", ("--remote", "ssh://pi:99999"), "Port out of range"),
            ("url-port-nan", ("--remote", "ssh://pi:NaN"), "expected ssh://"),
            ("url-option-host", ("--remote", "ssh://-oProxyCommand=x"), "no valid host name"),
            ("python-empty", ("--remote", "ssh://pi", "--remote-python", ""), "--remote-python: give"),
            ("key-missing", ("--remote", "ssh://pi", "--ssh-key", "{tmp}/none"), "--ssh-key {tmp}/none: no such file"),
            ("key-empty", ("--remote", "ssh://pi", "--ssh-key", ""), "no such file"),
            ("option-no-value", ("--remote", "ssh://pi", "--ssh-option", "Port"), "expected KEY=VALUE"),
            ("option-empty", ("--remote", "ssh://pi", "--ssh-option", ""), "expected KEY=VALUE"),
            ("option-hostkey-off", ("--remote", "ssh://pi", "--ssh-option", "StrictHostKeyChecking=no"), "stays on"),
            ("option-batchmode", ("--remote", "ssh://pi", "--ssh-option", "BatchMode=no"), "never prompts"),
            ("no-cache-alone", ("--remote-no-cache",), "--remote-no-cache go(es) with --remote URL"),
            ("loadgen", ("--remote", "ssh://pi", "--loadgen", "offline"), "--loadgen runs MLPerf LoadGen"),
            ("mobile", ("--remote", "ssh://pi", "--mobile"), "--mobile pins this machine's cores"),
            ("unreachable", ("--remote", "ssh://127.0.0.1:1", "--ssh-option", "ConnectTimeout=5"), "unreachable"),
        )
    ],
    Case(
        "remote-bench-keras",
        ("bench", "--model", "mobilenet_v2", "--targets", "keras-fp32", "--remote", "ssh://pi", "--out", "{out}"),
        2,
        "keras-fp32 runs in TensorFlow",
    ),
    # --- sign-off plans: checked whole when loaded
    Case(
        "plan-not-utf8",
        ("signoff", "{plan}", "--out", "{out}"),
        2,
        "plan.yaml:2: not UTF-8",
        build=plan(raw=b"name: x\nmodels: [caf\xe9]\n"),
    ),
    *(
        Case(f"plan-{key}-{value!r}", ("signoff", "{plan}", "--out", "{out}"), 2, fragment, build=plan({key: value}))
        for key, value, fragment in (
            ("limit", "abc", "limit: expected a whole number >= 1, got 'abc'"),
            ("limit", 12.5, "limit: expected a whole number >= 1, got 12.5"),
            ("chunk_images", 0, "chunk_images: expected a whole number >= 1, got 0"),
            ("chunk_images", -1, "chunk_images: expected a whole number >= 1, got -1"),
            ("chunk_images", "x", "chunk_images: expected a whole number >= 1, got 'x'"),
            ("bootstrap_samples", -10, "bootstrap_samples: expected a whole number >= 1, got -10"),
            ("bootstrap_samples", "many", "bootstrap_samples: expected a whole number >= 1, got 'many'"),
            ("bootstrap_samples", 0, "bootstrap_samples: expected a whole number >= 1, got 0"),
            ("confidence", 1.5, "confidence: expected a number between 0 and 1 (exclusive), got 1.5"),
            ("confidence", "high", "confidence: expected a number between 0 and 1 (exclusive), got 'high'"),
            ("confidence", 0, "confidence: expected a number between 0 and 1 (exclusive), got 0"),
            ("workers", "x", "workers: expected a whole number >= 1, got 'x'"),
            ("targets", 5, "targets: expected a list of names (or one comma-separated text), got 5"),
            ("models", "tiny", "models: expected a list of models (names or mappings), got 'tiny'"),
            ("reference", "tflite-int3", "unknown target 'tflite-int3'"),
            ("reference", "tflite-fp32", "nothing to compare with the reference tflite-fp32"),
            ("gates", [{"metric": "mAP", "relative": 0.9}], "gates[0].metric: 'mAP' is not measured on this dataset"),
            ("gates", [{"relative": "abc"}], "gates[0].relative: expected a number, got 'abc'"),
            ("gates", [{"relative": 0.9, "targets": ["onnx-*"]}], "would apply to nothing"),
            ("gates", [{"relative": 0.9, "targets": "onnx-*"}], "['onnx-*'] match none of the compared targets"),
            ("calibration", {"num_images": 0}, "calibration: num_images: expected a whole number >= 1, got 0"),
            ("post_training", {"equalize": "yes"}, "post_training: equalize: expected true or false, got 'yes'"),
            ("post_training", {"relu6": "clip"}, "post_training: relu6: relu6 mode must be one of keep"),
            ("post_training", {"fold": True}, "post_training: unknown key(s) fold"),
            ("post_training", "best", "post_training: expected auto or a mapping (equalize, bias_correct, relu6"),
            ("post_training", {"adaround": "yes"}, "post_training: adaround: expected true, false or a mapping"),
            ("post_training", {"adaround": {"iterations": 0}}, "adaround: iterations: expected a whole number >= 1"),
            ("post_training", {"adaround": {"images": -3}}, "adaround: images: expected a whole number >= 1, got -3"),
            ("post_training", {"adaround": {"images": 2.5}}, "adaround: images: expected a whole number >= 1, got 2.5"),
            ("post_training", {"adaround": {"steps": 10}}, "post_training: adaround: unknown key(s) steps"),
            (
                "post_training",
                {"adaround": {"iterations": 10**9}},
                "adaround: iterations: adaround iterations must be a whole number from 1 to 100000",
            ),
            ("models", model_edit(preprocess="mode=raw,size="), "models[0].preprocess expects key=value pairs"),
            ("models", model_edit(preprocess={"std": 0}), "models[0].preprocess: preprocess std must be at least"),
            ("models", model_edit(preprocess=["size", 32]), "models[0].preprocess: expected 'mode=tf,size=224,...'"),
            ("models", model_edit(name="no-such-model"), "models[0]: unknown model 'no-such-model'"),
            ("models", model_edit(weights="absent.weights.h5"), "models[0]: weights: file not found"),
            ("name", "../../escape", "name: '../../escape' names the results folder"),
            ("remote", 5, "remote: expected ssh://[user@]host[:port] or a mapping"),
            ("remote", "", "remote: url: expected a text value"),
            ("remote", "http://pi", "unknown scheme 'http'"),
            ("remote", "ssh://pi:0", "port must be 1..65535"),
            ("remote", {"url": "ssh://pi", "port": 22}, "remote: unknown key(s) port"),
            ("remote", {"url": "ssh://pi", "ssh_options": "Port=22"}, "ssh_options: expected a list of K=V"),
            ("remote", {"url": "ssh://pi", "ssh_options": ["Port"]}, "expected KEY=VALUE"),
            ("remote", {"url": "ssh://pi", "cache": "no"}, "cache: expected true or false"),
            ("remote", {"url": "ssh://pi", "ssh_key": "/no/such/key"}, "--ssh-key /no/such/key: no such file"),
            ("trust_savedmodel", "yes", "trust_savedmodel: expected true or false, got 'yes'"),
            ("bench", "yes", "bench: expected true, false or a mapping"),
            ("bench", {"ratio_precision": 0}, "bench: ratio_precision: expected a number between 0 and 1"),
            ("bench", {"ratio_precision": "nan"}, "bench: ratio_precision: expected a number between 0 and 1"),
            ("bench", {"min_rounds": 1}, "bench: min_rounds: expected a whole number >= 2, got 1"),
            ("bench", {"max_seconds": -5}, "bench: max_seconds: expected a positive number of seconds, got -5"),
            ("bench", {"max_seconds": 1e300}, "bench: max_seconds: expected a positive number of seconds"),
            ("bench", {"queries_per_round": 0}, "bench: queries_per_round: expected a whole number >= 1, got 0"),
            ("bench", {"reference": "onnx-fp32"}, "bench: reference: 'onnx-fp32' is none of the plan's targets"),
            ("bench", {"enabled": "no"}, "bench: enabled: expected true or false, got 'no'"),
            ("bench", {"rounds": 5}, "bench: unknown key(s) rounds"),
        )
    ),
    Case(
        "plan-savedmodel-not-trusted",
        ("signoff", "{plan}", "--out", "{out}"),
        2,
        "models[0]: name: {sm}: a SavedModel folder is a program",
        build=lambda tmp, env: {
            **savedmodel_folder(tmp, env),
            **plan({"models": [{"name": str(tmp / "sm")}]})(tmp, env),
        },
    ),
    Case(
        "plan-string-forms-accepted",
        ("signoff", "{plan}", "--out", "{out}", "-q"),
        0,
        "PASS: 1 of 1 gates passed",
        frozenset(
            {"signoff.jsonl", "verdicts.jsonl", "environment.json", "plan.json", "report.md", "report.html"}
            | {"report_chart.png", "artifacts", "state"}
        ),
        plan({"targets": "tflite-fp32", "gates": [{"relative": 0.9, "targets": "tflite-*"}]}),
        inprocess=True,
        check=signoff_ran,
    ),
    # --- bench: interleaved timing options (issue 23); refused before anything is timed
    *(
        Case(f"bench-{name}", bench_argv(*extra), 2, message, build=two_tflite)
        for name, extra, message in (
            ("reference-unknown", ("--reference", "zzz"), "--reference zzz is none of the configurations to bench"),
            ("reference-empty", ("--reference", ""), "--reference is empty"),
            ("ratio-precision-0", ("--ratio-precision", "0"), "--ratio-precision must be a fraction between 0 and 1"),
            ("ratio-precision-1", ("--ratio-precision", "1"), "--ratio-precision must be a fraction between 0 and 1"),
            ("ratio-precision-neg", ("--ratio-precision=-0.1",), "--ratio-precision must be a fraction between"),
            ("ratio-precision-nan", ("--ratio-precision", "nan"), "--ratio-precision must be a fraction between"),
            ("ratio-precision-huge", ("--ratio-precision", "1e300"), "--ratio-precision must be a fraction between"),
            ("ratio-precision-word", ("--ratio-precision", "tight"), "argument --ratio-precision: invalid float"),
            ("ratio-precision-empty", ("--ratio-precision", ""), "argument --ratio-precision: invalid float"),
            ("min-rounds-1", ("--min-rounds", "1"), "--min-rounds must be at least 2"),
            ("min-rounds-neg", ("--min-rounds=-3",), "--min-rounds must be at least 2"),
            ("min-rounds-float", ("--min-rounds", "2.5"), "argument --min-rounds: invalid int value"),
            ("max-seconds-0", ("--max-seconds", "0"), "--max-seconds must be a positive number of seconds"),
            ("max-seconds-inf", ("--max-seconds", "inf"), "--max-seconds must be a positive number of seconds"),
            ("max-seconds-nan", ("--max-seconds", "nan"), "--max-seconds must be a positive number of seconds"),
            ("queries-per-round-0", ("--queries-per-round", "0"), "argument --queries-per-round: expected a positive"),
        )
    ),
    Case(
        "bench-reference-fails-to-run",
        bench_argv("--reference", "{tmp}/a-fp32.tflite"),
        2,
        "the reference a-fp32 ({tmp}/a-fp32.tflite) failed to run",
        build=two_tflite,
    ),
    Case(
        "plan-remote-with-ray",
        ("signoff", "{plan}", "--out", "{out}"),
        2,
        "remote: a run on a remote device goes through the local executor: drop executor: ray",
        build=plan({"remote": "ssh://pi", "executor": "ray"}),
    ),
    # --- reports of damaged folders
    Case(
        "report-corrupt-environment",
        ("report", "{results}"),
        2,
        "environment.json: the environment record is not valid JSON",
        build=results_folder("{"),
    ),
    Case(
        "report-verdict-row-missing-keys",
        ("report", "{results}"),
        2,
        "verdicts.jsonl:1: verdict row lacks gate, verdict",
        build=results_folder(verdict={"model": "tiny", "target": "tflite-int8", "passed": True}),
    ),
    # --- issue 26: the last bad inputs (ordered by value)
    Case(
        "cache-zero-byte-shard",
        eval_argv("--input-cache", "{cache}"),
        0,
        "keras-fp32",
        EVAL_OUT,
        cache_with_empty_shard,
        inprocess=True,
        check=both(rows(images=6), cache_holds),
    ),
    Case(
        "out-name-too-long",
        eval_argv(),
        2,
        "cannot write there (File name too long)",
        build=lambda tmp, env: {"out": str(tmp / ("x" * 300))},
    ),
    Case(
        "plan-calibration-data-is-the-dataset",
        ("signoff", "{plan}", "--out", "{out}"),
        2,
        "calibration image(s) are also evaluation images",
        build=plan({"targets": ["tflite-int8"], "calibration": lambda doc: {"data": doc["dataset"], "num_images": 2}}),
    ),
    *(
        Case(f"plan-{key}-{value!r}", ("signoff", "{plan}", "--out", "{out}"), 2, fragment, build=plan({key: value}))
        for key, value, fragment in (
            ("ort_providers", ["foo"], "ort_providers: unknown execution provider 'foo'"),
            ("ort_providers", "foo", "ort_providers: unknown execution provider 'foo'"),
            ("ort_providers", "cpu,", "ort_providers: an empty provider name in 'cpu,'"),
            ("ort_providers", [], "ort_providers: no execution provider given"),
            ("ort_providers", 5, "ort_providers: expected provider names"),
            ("post_training", [], "post_training: expected auto or a mapping"),
            ("post_training", False, "post_training: expected auto or a mapping"),
            ("calibration", [], "calibration: expected a mapping"),
            ("tensorrt", [], "tensorrt: expected a mapping"),
        )
    ),
    Case(
        "plan-ort-providers-unavailable-for-an-onnx-target",
        ("signoff", "{plan}", "--out", "{out}"),
        2,
        "ort_providers: CUDAExecutionProvider not available",
        build=plan({"ort_providers": ["cuda"], "targets": ["onnx-fp32"]}),
        inprocess=True,
    ),
    Case(
        "plan-ort-providers-unavailable-unused",
        ("signoff", "{plan}", "--out", "{out}", "-q"),
        0,
        "PASS: 1 of 1 gates passed",
        frozenset(
            {"signoff.jsonl", "verdicts.jsonl", "environment.json", "plan.json", "report.md", "report.html"}
            | {"report_chart.png", "artifacts", "state"}
        ),
        plan({"ort_providers": ["cuda"]}),
        inprocess=True,
        check=signoff_ran,
    ),
    Case("out-empty", eval_argv("--out", ""), 2, "--out '': an empty path"),
    Case("out-inside-data-folder", eval_argv(), 2, "is inside the data folder of --data", build=out_inside_data),
    Case(
        "out-inside-calib-data-folder",
        eval_argv("--calib-data", "images:{cal}"),
        2,
        "is inside the data folder of --calib-data",
        build=out_inside_calib_data,
    ),
    Case(
        "signoff-out-inside-plan-dataset",
        ("signoff", "{plan}", "--out", "{out}"),
        2,
        "is inside the data folder of the plan's dataset",
        build=lambda tmp, env: {**plan()(tmp, env), "out": str(Path(env["data"]) / "results")},
    ),
    Case("labels-missing", eval_argv("--labels", "{tmp}/absent.txt"), 2, "--labels {tmp}/absent.txt: file not found"),
    Case("labels-a-folder", eval_argv("--labels", "{tmp}"), 2, "--labels {tmp}: is a folder, not a file"),
    Case(
        "calib-list-with-bom",
        eval_argv("--calib-list", "{list}"),
        0,
        "keras-fp32",
        EVAL_OUT,
        listing_with_bom,
        inprocess=True,
        check=rows(images=4),
    ),
    Case(
        "labels-file-with-bom",
        eval_argv(data="imagenet:{flat}"),
        0,
        "keras-fp32",
        EVAL_OUT,
        flat(b"\xef\xbb\xbfa.JPEG 0\nb.JPEG 1\n"),
        inprocess=True,
        check=rows(images=2),
    ),
    Case(
        "cache-stale-temporary-of-a-dead-process",
        eval_argv("--input-cache", "{cache}"),
        0,
        "keras-fp32",
        EVAL_OUT,
        cache_with_stale_temporary,
        inprocess=True,
        check=cache_holds,
    ),
    Case(
        "nan-weights-tflite-int8",
        eval_argv(targets="keras-fp32,tflite-int8"),
        1,
        "FAILED tflite-int8: layer 'conv1': weight 'kernel' holds NaN or inf values",
        EVAL_OUT,
        lambda tmp, env: {"model": str(env["nan_model"])},
        inprocess=True,
        check=target_failed("tflite-int8", "holds NaN or inf"),
    ),
    Case(
        "weights-1e38-tflite-int8-no-converter-crash",
        eval_argv(targets="keras-fp32,tflite-int8,tflite-int16x8"),
        1,
        "outputs NaN or inf values in calibration batch 1",
        EVAL_OUT,
        lambda tmp, env: {"model": str(env["inf_model"])},
        inprocess=True,
        check=both(
            target_failed("tflite-int8", "calibration batch 1"), target_failed("tflite-int16x8", "calibration batch 1")
        ),
    ),
    Case(
        "fewer-outputs-than-classes",
        eval_argv(),
        2,
        "two has 2 outputs (classes 0..1)",
        build=two_output_model,
        inprocess=True,
    ),  # fmt: skip
    Case(
        "progressive-jpeg-cut-in-half-with-end-marker",
        eval_argv(),
        0,
        "1 unreadable skipped",
        EVAL_OUT | {"skipped.txt"},
        with_bad_image("prog.JPEG", progressive_jpeg_cut_in_half),
        inprocess=True,
        check=both(rows(images=6, skipped=1), skipped_holds("prog.JPEG", "corrupt JPEG")),
    ),
    Case(
        "coco-nan-bbox",
        eval_argv(data="coco:{coco}"),
        2,
        "holds a value that is not a finite number",
        build=coco(lambda doc, root: doc["annotations"][0].update(bbox=[float("nan"), 1, 2, 2])),
    ),
    Case(
        "coco-annotation-on-unknown-image",
        eval_argv(data="coco:{coco}"),
        2,
        "annotations[0] is on image_id 424242, which no entry of 'images' has",
        build=coco(lambda doc, root: doc["annotations"][0].update(image_id=424242)),
    ),
    Case(
        "coco-image-id-1e30",
        eval_argv(data="coco:{coco}"),
        2,
        "images[0].id: expected a whole number id >= 0, got 1e+30",
        build=coco(lambda doc, root: doc["images"][0].update(id=1e30)),
    ),
    Case(
        "calibration-images-counts-readable-ones",
        eval_argv("--calib-data", "images:{cal}", "--calib-images", "4", targets="keras-fp32,tflite-int8"),
        0,
        "4 calibration images (1 unreadable, left out)",
        EVAL_OUT | {"artifacts"},
        calib_with_unreadable,
        inprocess=True,
        check=rows(calibration_images=3),
    ),
    *(
        Case(
            f"max-image-pixels-{value}",
            eval_argv(),
            2,
            f"QUANTSHIP_MAX_IMAGE_PIXELS='{value}': expected a whole number of pixels >= 1",
            env=(("QUANTSHIP_MAX_IMAGE_PIXELS", value),),
        )
        for value in ("abc", "0", "-1")
    ),
    Case(
        "bias-correct-with-a-size-the-model-does-not-take",
        eval_argv("--bias-correct", "--preprocess", "mode=tf,size=40,crop_pct=1.0", targets="keras-fp32,tflite-int8"),
        1,
        "the calibration images are (40, 40, 3), the model takes (32, 32, 3)",
        EVAL_OUT,
        inprocess=True,
        check=target_failed("tflite-int8", "--preprocess (size, layout) does not fit the model"),
    ),
    Case(
        "report-row-without-target",
        ("report", "{results}"),
        2,
        "results.jsonl: row 1 lacks target",
        build=results_folder(drop=("target",)),
    ),
    Case(
        "loadgen-empty",
        ("bench", "--artifact", "{tmp}/m.tflite", "--loadgen", "", "--out", "{out}"),
        2,
        "argument --loadgen: expected LoadGen scenario, got an empty text",
    ),
    Case(
        "loadgen-stray-comma",
        ("bench", "--artifact", "{tmp}/m.tflite", "--loadgen", "singlestream,", "--out", "{out}"),
        2,
        "argument --loadgen: an empty name in 'singlestream,'",
    ),
    Case("ort-providers-stray-comma", eval_argv("--ort-providers", "cpu,"), 2, "an empty provider name in 'cpu,'"),
    Case("ort-providers-unknown", eval_argv("--ort-providers", "foo"), 2, "unknown execution provider 'foo'"),
    Case(
        "ort-providers-unavailable",
        eval_argv("--ort-providers", "cuda", targets="onnx-fp32"),
        2,
        "--ort-providers: CUDAExecutionProvider not available",
        inprocess=True,
    ),
    Case(
        "diff-ort-providers-unavailable",
        ("diff", "--model", "{model}", "--preprocess", P, "--data", "imagenet:{data}", "--images", "2")
        + ("--calib-images", "2", "--targets", "keras-fp32,onnx-fp32", "--ort-providers", "cuda", "--out", "{out}"),
        2,
        "--ort-providers: CUDAExecutionProvider not available",
        inprocess=True,
    ),
    Case(
        "ray-address-empty",
        ("signoff", "{plan}", "--ray-address", "", "--out", "{out}"),
        2,
        "argument --ray-address: expected the Ray head's HOST:PORT, got an empty text",
        build=plan(),
    ),
    # A dangling link is an error, not a warning: the run would quietly evaluate a subset of the data the user laid
    # out (a link into a folder that is not mounted), and a warning scrolls away above the results.
    Case("dangling-symlink-in-data", eval_argv(), 2, "gone.JPEG: a symbolic link to", build=dangling_symlink),
]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_env(tmp_path_factory) -> dict:
    """What every row shares: a 6-image dataset, and a model path for the rows refused before a model is read."""
    root = tmp_path_factory.mktemp("bad-inputs")
    placeholder = root / "tiny.keras"
    placeholder.write_bytes(b"never read: refused before any model is loaded")
    return {"model": placeholder, "data": write_synset_dataset(root / "data", 2, seed=3)}


@pytest.fixture(scope="module")
def model_env(data_env, trained_tiny, tmp_path_factory) -> dict:
    """For the rows that run: the tiny model, its NaN and overflowing copies, an untrained tiny SSD."""
    import keras

    from detection_fixtures import build_tiny_detector

    model, path = trained_tiny
    root = tmp_path_factory.mktemp("bad-inputs-models")
    broken = {}
    for name, value in (("nan", np.nan), ("inf", 1e38)):
        clone = keras.models.clone_model(model)
        clone.set_weights([np.full_like(w, value) for w in model.get_weights()])
        broken[name] = root / f"{name}.keras"
        clone.save(broken[name])
    detector, cfg = build_tiny_detector()
    detector.save(root / "detector.keras")
    (root / "anchors.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    return {
        **data_env,
        "model": path,
        "nan_model": broken["nan"],
        "inf_model": broken["inf"],
        "detector": root / "detector.keras",
        "anchors": root / "anchors.json",
    }


# ------------------------------------------------------------------------------------------------ runner

_SUBPROCESS = (
    "import sys; from quantship.cli import main; rc = main(sys.argv[1:]); "
    f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules)); sys.exit(rc)"
)


def _files(out: Path, ignore: set[str]) -> set[str]:
    return {p.name for p in out.iterdir()} - ignore if out.is_dir() else set()


def _run_subprocess(argv: list[str], env: tuple[tuple[str, str], ...] = ()) -> tuple[int, str, str]:
    res = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **dict(env)},
    )
    out_lines = res.stdout.splitlines()
    heavy = next((ln for ln in out_lines if ln.startswith("HEAVY=")), "HEAVY=?")
    assert heavy == "HEAVY=", f"refused after importing {heavy[6:]}: not before heavy work"
    return res.returncode, res.stdout, res.stderr


def _run_inprocess(argv: list[str], capfd) -> tuple[int, str, str]:
    from quantship.cli import main

    before, stream = os.fstat(2), sys.stderr
    code = main(argv)
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino), "main() did not restore fd 2"
    assert sys.stderr is stream, "main() did not restore sys.stderr"
    captured = capfd.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.inprocess else []) for c in CASES]
)
def test_bad_input(case: Case, request, tmp_path, capfd):
    env = request.getfixturevalue("model_env" if case.inprocess else "data_env")
    capfd.readouterr()  # what building the shared models printed (TensorFlow's start-up lines) is not the row's
    values = {k: str(v) for k, v in env.items()}
    values.update(tmp=str(tmp_path), out=str(tmp_path / "out"))
    values.update(case.build(tmp_path, env) or {})
    argv = [a.format(**values) for a in case.argv]
    message = case.message.format(**values)
    code, stdout, stderr = _run_inprocess(argv, capfd) if case.inprocess else _run_subprocess(argv, case.env)

    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    assert code == case.code, f"exit {code}, expected {case.code}\n{stdout[-2000:]}\n{stderr[-2000:]}"
    if case.code == 2:
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert message in stdout + stderr, f"'{message}' not in:\n{stdout[-2000:]}\n{stderr[-2000:]}"

    out = Path(values["out"])
    expected = {(out.name if n == "<file>" else n) for n in case.out}
    try:
        out.exists()
    except OSError:  # a name the file system refuses (too long): nothing can have been written there
        assert expected == set(), expected
        return
    if out.is_file():
        assert expected == {out.name}, f"{out} is a file"
    else:
        held = _files(out, LOGS if expected else set())
        assert held == expected, f"--out holds {sorted(held)}, expected {sorted(expected)}"
        leftovers = [p for p in out.rglob("*") if ".tmp" in p.name or p.name == ".quantship-tmp"]
        assert not leftovers, f"temporary files left: {leftovers}"
        mode = 0o666 & ~_umask()
        for p in out.rglob("*"):
            if p.is_file() and p.name != "keep.txt":
                assert p.stat().st_mode & 0o777 == mode, f"{p}: mode {p.stat().st_mode & 0o777:o}, umask wants {mode:o}"
    # Temporary folders of this process (SavedModel exports) stay inside --out, none in the system's temp folder.
    assert not list(Path(tempfile.gettempdir()).glob(f"*-{os.getpid()}-*")), "left in the system temp folder"
    if case.check is not None:
        case.check(out)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_killed_conversion_leaves_no_temporary_files(trained_tiny, tmp_path):
    """``kill`` (SIGTERM) during the SavedModel export behind TFLite conversion: exit 130, one line, and neither the
    export nor any atomic-write temporary is left in the output folder."""
    import signal
    import time

    _, model = trained_tiny
    out = tmp_path / "out"
    argv = ["convert", "--model", str(model), "--preprocess", TINY_PREPROCESS, "--targets", "tflite-fp32"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantship", *argv, "--out", str(out), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(out.glob(".quantship-tmp/savedmodel-*/model/*")) and proc.poll() is None:
        assert time.monotonic() < deadline, "the export never started"
        time.sleep(0.02)
    assert proc.poll() is None, "the conversion ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert [ln for ln in err.splitlines() if ln.strip()] == ["quantship convert: interrupted"]
    left = [p for p in out.rglob("*") if ".tmp" in p.name or p.name == ".quantship-tmp"]
    assert not left, left
