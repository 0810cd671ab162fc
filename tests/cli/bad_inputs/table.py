"""Every bad input gets one clear error, or a correct result (issues 14, 26): the table's shared parts.

Each row builds its input in a temporary folder, runs the exact command, and checks the exit code, a fragment of
the message (for exit code 2: the only line on stderr, no traceback) and what ``--out`` holds afterwards: nothing for
a case refused before any work; for a case that skips and continues, or records a failure in a row, exactly the
files and rows it should have, no temporary file left, every file with the permissions of the user's umask.

Every row calls the CLI's ``main()`` in-process (it must put file descriptor 2 and ``sys.stderr`` back when it
returns): a Python start-up and the package's import per row cost more than most rows' work (issue 24: ~1-2 s each,
over 200 rows). Cases refused before any heavy work run with every import of a heavy library (TensorFlow, Keras,
ONNX Runtime, TensorRT, LiteRT) refused and recorded (:func:`heavy_imports_refused`): the row fails if one was
tried, as it would have shown in a process of its own. Rows marked ``heavy`` get past the checks, load a model and
share one tiny model trained once per session. Rows that need a process boundary (environment variables) and a
sample of one row per command (``subprocess=True``: the real entry point, its exit code and the heavy imports of a
fresh interpreter) run as subprocesses.

The rows live in ``test_<command>.py`` beside this file, one file per command (the split issue 24 asked for), each
running its rows through :func:`run_case`; the data and models they share are built once per session
(``conftest.py``). Add a row to the command's file whenever an option or a plan field is added (zero, negative, NaN,
huge, wrong type, empty string, missing file, file where a folder is expected).
"""

from __future__ import annotations

import contextlib
import importlib.abc
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
from typing import Any, Callable, Iterator

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
        heavy: The row loads a model (heavy libraries allowed; the trained models are built for it).
        code: Expected exit code.
        message: A fragment the message must contain.
        out: The names ``--out`` holds afterwards (logs aside); :data:`NOTHING` for none.
        check: More checks on the output folder (rows, file contents).
        env: Environment variables of the run (the row runs as a subprocess).
        subprocess: Run as ``python -c 'main()'`` in a process of its own (the per-command sample).
    """

    id: str
    argv: tuple[str, ...]
    code: int
    message: str
    out: frozenset[str] = NOTHING
    build: Callable[[Path, dict], dict] = lambda tmp, env: {}
    heavy: bool = False
    check: Callable[[Path], None] | None = None
    env: tuple[tuple[str, str], ...] = ()
    subprocess: bool = False


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


class HugeArray:
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


def file_name_outside(doc: dict, root: Path) -> None:
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


def broken_images(tmp: Path) -> dict:
    """A folder of two files named as images that no decoder reads."""
    (tmp / "broken").mkdir(exist_ok=True)
    (tmp / "broken" / "a.jpg").write_bytes(b"\xff\xd8 not a jpeg \xff\xd9")
    (tmp / "broken" / "b.png").write_bytes(b"\x89PNG\r\n broken")
    return {}


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


class _HeavyImportRefuser(importlib.abc.MetaPathFinder):
    """A finder ahead of all others that records and refuses every import of a heavy library."""

    def __init__(self) -> None:
        self.tried: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            self.tried.append(name)
            raise ModuleNotFoundError(f"{name}: a heavy import in a row refused before any heavy work")
        return None


@contextlib.contextmanager
def heavy_imports_refused() -> Iterator[list[str]]:
    """While the block runs, every import of a heavy library fails and is recorded in the list it yields.

    The heavy modules an earlier row loaded leave ``sys.modules`` for the block (else ``import tensorflow`` would
    find them there and pass unseen) and come back afterwards.
    """
    loaded = {k: m for k, m in sys.modules.items() if k.split(".")[0] in HEAVY}
    for name in loaded:
        del sys.modules[name]
    refuser = _HeavyImportRefuser()
    sys.meta_path.insert(0, refuser)
    try:
        yield refuser.tried
    finally:
        sys.meta_path.remove(refuser)
        sys.modules.update(loaded)


def _run_inprocess(argv: list[str], capfd, light: bool = False) -> tuple[int, str, str]:
    """``main(argv)`` in this process; ``light``: with every heavy import refused (a row refused before any)."""
    from quantship.cli import main

    before, stream = os.fstat(2), sys.stderr
    with heavy_imports_refused() if light else contextlib.nullcontext([]) as tried:
        code = main(argv)
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino), "main() did not restore fd 2"
    assert sys.stderr is stream, "main() did not restore sys.stderr"
    captured = capfd.readouterr()
    assert not tried, f"refused after importing {', '.join(sorted(set(tried)))}: not before heavy work"
    return code, captured.out, captured.err


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def params(cases: list[Case]) -> list:
    """pytest parameters of ``cases``: named by their id; the rows that load a model are marked slow."""
    return [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.heavy else []) for c in cases]


def run_case(case: Case, request, tmp_path, capfd):
    """Build the row's input, run its command, check exit code, message and what --out holds."""
    env = request.getfixturevalue("model_env" if case.heavy else "data_env")
    capfd.readouterr()  # what building the shared models printed (TensorFlow's start-up lines) is not the row's
    values = {k: str(v) for k, v in env.items()}
    values.update(tmp=str(tmp_path), out=str(tmp_path / "out"))
    values.update(case.build(tmp_path, env) or {})
    argv = [a.format(**values) for a in case.argv]
    message = case.message.format(**values)
    if case.subprocess or case.env:
        code, stdout, stderr = _run_subprocess(argv, case.env)
    else:
        code, stdout, stderr = _run_inprocess(argv, capfd, light=not case.heavy)

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
