"""Every command works from the command line (issue 26).

1. One table, a row per command (and per mode a command has, as ``bench --loadgen``), each run in-process through
   :func:`quantship.cli.main` (the real parser) on the tiny model and generated data, with the option shapes the
   README shows; a row asserts exit 0 and the files the command must write. The table is checked against the
   command registry: a command without a row fails the test, so every command added later gets one.
2. (Every documented ``quantship`` line parsing with the current parser is tests/test_docs.py's.)

A command whose function was tested while its parser was broken shipped once (``quantship diff`` lacked
``--calib-percentile``): these tests go through the parser on purpose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import TINY_PREPROCESS, write_synset_dataset

ROOT = Path(__file__).resolve().parents[2]
P = TINY_PREPROCESS


@dataclass(frozen=True)
class Row:
    """One command run.

    Attributes:
        id: The row's name (the command, and its mode when it has several).
        argv: After ``quantship``; ``{model}``, ``{data}``, ``{calib}``, ``{out}``, ``{tmp}``... are filled in.
        writes: Paths (relative to ``{out}``, or with placeholders) that must exist afterwards.
        stdout: A fragment the command must print.
        build: ``build(tmp, env) -> placeholders``: writes what the row needs beside the shared inputs.
        setup: ``setup(monkeypatch)``: reduced settings (the demo's target list).
        slow: Left out of the default run's budget.
    """

    id: str
    argv: tuple[str, ...]
    writes: tuple[str, ...] = ()
    stdout: str = ""
    build: Callable[[Path, dict], dict] | None = None
    setup: Callable[[pytest.MonkeyPatch], None] | None = None
    slow: bool = False


def signoff_plan(tmp: Path, env: dict) -> dict:
    """The plan shape the README shows: a dataset, a model with its preprocessing, targets, a gate."""
    import yaml

    doc = {
        "name": "commands",
        "dataset": f"imagenet:{env['data']}",
        "models": [{"name": env["model"], "preprocess": P}],
        "targets": ["tflite-fp32"],
        "gates": [{"metric": "top1", "relative": 0.9}],
        "bootstrap_samples": 50,
        "bench": {"max_seconds": 3},
    }
    path = tmp / "plan.yaml"
    path.write_text(yaml.safe_dump(doc))
    return {"plan": str(path)}


def results_folder(tmp: Path, env: dict) -> dict:
    """A results folder as ``quantship eval`` leaves it (what ``quantship report`` rebuilds a report from)."""
    folder = tmp / "out"
    folder.mkdir()
    rows = [
        {"model": "tiny", "target": t, "task": "classification", "images": 6, "top1": v, "status": "ok"}
        for t, v in (("keras-fp32", 0.5), ("tflite-int8", 0.4))
    ]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {}


def reduced_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's own model and photos, two of its thirteen targets (one float, one int8 through calibration)."""
    monkeypatch.setattr("quantship.jobs.demo.TARGETS", ("keras-fp32", "tflite-int8"))


MODEL = ("--model", "{model}", "--preprocess", P)
ROWS = (
    Row(
        "eval",
        ("eval", *MODEL, "--data", "imagenet:{data}", "--targets", "keras-fp32,tflite-fp32,tflite-int8")
        + ("--limit", "6", "--calib-images", "3", "--threads", "1", "--out", "{out}", "-q"),
        ("results.jsonl", "results.md", "artifacts/tiny-tflite-int8.tflite"),
        "top-1",
    ),
    Row(
        "eval-calib-data",
        ("eval", *MODEL, "--data", "imagenet:{data}", "--calib-data", "images:{calib}", "--calib-list", "{list}")
        + ("--calib-images", "2", "--targets", "keras-fp32,qdq-int8-entropy", "--out", "{out}", "-q"),
        ("results.jsonl", "results.md", "artifacts/tiny-qdq-int8-entropy.onnx"),
        build=lambda tmp, env: {"list": str(_calib_list(tmp, env))},
    ),
    Row(
        "convert",
        ("convert", *MODEL, "--data", "imagenet:{data}", "--targets", "tflite-fp32,tflite-int8")
        + ("--calib-images", "3", "--out", "{out}", "-q"),
        ("artifacts/tiny-tflite-fp32.tflite", "artifacts/tiny-tflite-int8.tflite"),
    ),
    Row(
        "calibrate",
        ("calibrate", *MODEL, "--data", "imagenet:{data}", "--calib-images", "4", "--method", "entropy")
        + ("--cache", "{out}/tiny.cache", "--qdq", "{out}/tiny-qdq.onnx", "--ranges", "{out}/ranges.json")
        + ("--out", "{out}", "-q"),
        ("tiny.cache", "tiny-qdq.onnx", "ranges.json"),
    ),
    Row(
        "bench",
        ("bench", *MODEL, "--targets", "tflite-fp32", "--data", "imagenet:{data}", "--threads", "1")
        + ("--batch-sizes", "1,2", "--warmup", "0", "--min-queries", "5", "--min-seconds", "0", "--out", "{out}", "-q"),
        ("bench.jsonl", "environment.json", "artifacts/tiny-tflite-fp32.tflite"),
    ),
    Row(
        "bench-loadgen",
        ("bench", *MODEL, "--targets", "tflite-fp32", "--threads", "1", "--loadgen", "singlestream")
        + ("--min-queries", "8", "--min-seconds", "0", "--warmup", "0", "--out", "{out}", "-q"),
        ("bench.jsonl", "loadgen"),
    ),
    Row(
        "sensitivity",
        ("sensitivity", *MODEL, "--data", "imagenet:{data}", "--images", "4", "--calib-images", "2")
        + ("--backend", "qdq", "--cumulative", "--weight-study", "fp16,int8-channel", "--gate", "top1>=0.5")
        + ("--threads", "1", "--out", "{out}", "-q"),
        ("sensitivity.jsonl",),
    ),
    Row(
        "signoff",
        ("signoff", "{plan}", "--out", "{out}", "-q"),
        ("signoff.jsonl", "verdicts.jsonl", "report.md", "report.html"),
        "PASS",
        build=signoff_plan,
    ),
    Row("report", ("report", "{out}"), ("report.md", "report.html"), "report:", build=results_folder),
    Row(
        "diff",
        ("diff", *MODEL, "--data", "imagenet:{data}", "--images", "4", "--calib-images", "2")
        + ("--targets", "keras-fp32,tflite-int8", "--drop-db", "10", "--threads", "1", "--out", "{out}", "-q"),
        ("diff.jsonl", "report.html"),
    ),
    Row(
        "demo",
        ("demo", "--threads", "1", "--out", "{out}", "-q"),
        ("results.jsonl", "predictions.jsonl", "predictions.md", "report.html"),
        setup=reduced_demo,
        slow=True,
    ),
    Row("models", ("models", "--no-stats"), stdout="efficientnet_lite0"),
    Row("targets", ("targets",), stdout="tflite-int8"),
)


def _calib_list(tmp: Path, env: dict) -> Path:
    names = sorted(p.name for p in Path(env["calib"]).rglob("*.JPEG"))[:3]
    path = tmp / "cal_list.txt"
    path.write_text("".join(f"{n}\n" for n in names))
    return path


def test_every_registered_command_has_a_row():
    from quantship.cli.registry import load_commands

    commands = load_commands()
    broken = {name: c.help for name, c in commands.items() if c.help.startswith("(unavailable")}
    assert not broken, f"commands that fail to import: {broken}"
    missing = set(commands) - {row.argv[0] for row in ROWS}
    assert not missing, f"commands without a row in tests/cli/test_commands.py ROWS: {sorted(missing)}"


@pytest.fixture(scope="module")
def env(trained_tiny, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("commands")
    data = write_synset_dataset(root / "data", 3, seed=11)
    calib = write_synset_dataset(root / "calib", 2, seed=12)
    return {"model": str(trained_tiny[1]), "data": str(data), "calib": str(calib)}


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=[pytest.mark.slow] * r.slow) for r in ROWS])
def test_command(row: Row, env, tmp_path, capsys, monkeypatch):
    from quantship.cli import main

    values = {**env, "tmp": str(tmp_path), "out": str(tmp_path / "out")}
    if row.build:
        values.update(row.build(tmp_path, env) or {})
    if row.setup:
        row.setup(monkeypatch)
    argv = [a.format(**values) for a in row.argv]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, f"quantship {' '.join(argv)}: exit {code}\n{captured.out[-3000:]}\n{captured.err[-3000:]}"
    assert "Traceback" not in captured.out + captured.err
    assert row.stdout in captured.out, captured.out[-3000:]
    out = Path(values["out"])
    missing = [w for w in row.writes if not (out / w.format(**values)).exists()]
    assert not missing, f"not written: {missing}; {out} holds {sorted(p.name for p in out.iterdir())}"
    for name in row.writes:
        path = out / name
        if path.suffix == ".jsonl":
            got = [json.loads(line) for line in path.read_text().splitlines()]
            assert got, f"{name} holds no row"
            failed = [r for r in got if r.get("status") == "failed"]
            assert not failed, f"{name}: failed rows {failed}"
