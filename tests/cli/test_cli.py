"""`quantship` end to end on generated data: the table, the result rows, and clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import TINY_PREPROCESS
from quantship.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantship", *args], capture_output=True, text=True, timeout=600)


OPTIONAL_EXTRAS = ("mlperf_loadgen", "tensorrt", "cuda", "ray")  # installed in CI; hidden here

HIDE_EXTRAS = f"""
import importlib.abc, sys
class HideExtras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {OPTIONAL_EXTRAS!r}:
            raise ImportError(f"{{name}} hidden by the test")
sys.meta_path.insert(0, HideExtras())
"""


def test_help_without_heavy_imports():
    # The optional extras are installed where the tests run, so the subprocess hides them itself.
    code = HIDE_EXTRAS + (
        "from quantship.cli import build_parser, main\n"
        "build_parser().format_help()\n"
        "import quantship.models.zoo, quantship.targets, quantship.targets.run, quantship.jobs.bench\n"
        "import quantship.jobs.signoff, quantship.signoff.ray_executor, quantship.signoff.cluster\n"
        "import quantship.evaluate.loadgen, quantship.evaluate.fbtime, quantship.evaluate.bench\n"
        "for argv in (['--help'], ['bench', '--help'], ['signoff', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, exc.code\n"
        "heavy = ('tensorflow', 'keras', 'onnxruntime', 'tensorrt', 'ai_edge_litert', 'mlperf_loadgen', 'ray')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "--loadgen" in out.stdout and "--forward-backward" in out.stdout and "--ray-address" in out.stdout
    assert run_cli("--help").returncode == 0


@pytest.mark.slow
def test_eval_all_tflite_targets(trained_tiny, synset_dataset, tmp_path, capfd):
    _, model_path = trained_tiny
    out = tmp_path / "out"
    capfd.readouterr()
    code = main(
        [
            "eval",
            "--model",
            str(model_path),
            "--preprocess",
            TINY_PREPROCESS,
            "--data",
            f"imagenet:{synset_dataset}",
            "--targets",
            "keras-fp32,tflite-fp32,tflite-fp16,tflite-dynamic,tflite-int8,tflite-int16x8",
            "--limit",
            "24",
            "--calib-images",
            "9",
            "--out",
            str(out),
            "--threads",
            "1",
        ]
    )
    res = capfd.readouterr()
    assert code == 0, res.err
    assert "tflite-int16x8" in res.out and "top-1" in res.out
    assert "Created TensorFlow Lite" not in res.out + res.err  # library chatter goes to the log
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["target"] for r in rows] == [
        "keras-fp32",
        "tflite-fp32",
        "tflite-fp16",
        "tflite-dynamic",
        "tflite-int8",
        "tflite-int16x8",
    ]
    for key in (
        "model",
        "target",
        "runtime",
        "dataset",
        "images",
        "top1",
        "top5",
        "delta_top1",
        "delta_top5",
        "artifact",
        "manifest",
    ):
        assert all(key in r for r in rows)
    assert all(r["images"] == 24 for r in rows)
    ref = rows[0]
    assert ref["top1"] >= 0.9
    assert rows[1]["top1"] == ref["top1"] and rows[1]["delta_top1"] == 0
    assert rows[4]["agreement_top1"] >= 0.9
    assert (out / "results.md").read_text().count("tflite-") >= 5


def _err(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_unknown_target_and_model(capsys, tmp_path):
    code, err = _err(
        capsys,
        "eval",
        "--model",
        "resnet50",
        "--weights",
        "random",
        "--data",
        f"imagenet:{tmp_path / 'data'}",  # --out beside the data, not inside it
        "--targets",
        "tflite-int3",
        "--out",
        str(tmp_path / "o"),
        "-v",
    )
    assert code == 2 and "unknown target 'tflite-int3'" in err and "Traceback" not in err
    code, err = _err(
        capsys,
        "eval",
        "--model",
        "resnet5000",
        "--data",
        f"imagenet:{tmp_path / 'data'}",
        "--targets",
        "keras-fp32",
        "--out",
        str(tmp_path / "o"),
        "-v",
    )
    assert code == 2 and "unknown model 'resnet5000'" in err


def test_missing_ground_truth_exit_code(capsys, tmp_path, synset_dataset):
    flat = tmp_path / "flat"
    flat.mkdir()
    src = next(synset_dataset.rglob("*.JPEG"))
    (flat / src.name).write_bytes(src.read_bytes())
    code, err = _err(
        capsys,
        "eval",
        "--model",
        "mobilenet_0.25_128",
        "--weights",
        "random",
        "--data",
        f"imagenet:{flat}",
        "--targets",
        "keras-fp32",
        "--out",
        str(tmp_path / "o"),
        "-v",
    )
    assert code == 2 and "no ground truth" in err


@pytest.mark.slow
def test_fewer_images_than_asked(capsys, trained_tiny, synset_dataset, tmp_path):
    _, model_path = trained_tiny
    code, err = _err(
        capsys,
        "eval",
        "--model",
        str(model_path),
        "--preprocess",
        TINY_PREPROCESS,
        "--data",
        f"imagenet:{synset_dataset}",
        "--targets",
        "keras-fp32,tflite-int8",
        "--limit",
        "1000",
        "--out",
        str(tmp_path / "o"),
        "-v",
    )
    assert code == 2 and "36 images" in err and "--limit" in err
    assert not (tmp_path / "o" / "results.jsonl").exists()


@pytest.mark.slow
def test_corrupt_image_counted_in_results(trained_tiny, synset_dataset, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synset_dataset, data)
    victim = next(data.rglob("*.JPEG"))
    victim.write_bytes(victim.read_bytes()[:300])
    _, model_path = trained_tiny
    code = main(
        [
            "eval",
            "--model",
            str(model_path),
            "--preprocess",
            TINY_PREPROCESS,
            "--data",
            f"imagenet:{data}",
            "--targets",
            "keras-fp32",
            "--out",
            str(tmp_path / "o"),
            "-q",
            "-v",
        ]
    )
    assert code == 0
    row = json.loads((tmp_path / "o" / "results.jsonl").read_text().splitlines()[0])
    assert row["skipped"] == 1 and row["images"] == 35
    assert victim.name in (tmp_path / "o" / "skipped.txt").read_text()


def test_corrupt_model_file(capsys, tmp_path, synset_dataset):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    code, err = _err(
        capsys,
        "eval",
        "--model",
        str(bad),
        "--preprocess",
        TINY_PREPROCESS,
        "--data",
        f"imagenet:{synset_dataset}",
        "--targets",
        "keras-fp32",
        "--out",
        str(tmp_path / "o"),
        "-v",
    )
    assert code == 2 and "bad.keras" in err and "Traceback" not in err


def test_bad_preprocess_option(capsys, tmp_path, synset_dataset):
    code, err = _err(
        capsys,
        "eval",
        "--model",
        "mobilenet_0.25_128",
        "--weights",
        "random",
        "--preprocess",
        "mode=tf,colour=red",
        "--data",
        f"imagenet:{synset_dataset}",
        "--targets",
        "keras-fp32",
        "--out",
        str(tmp_path / "o"),
        "-v",
    )
    assert code == 2 and "colour" in err


def test_a_closed_pipe_ends_quietly():
    """`quantship targets | head -1`: the reader closes the pipe; no BrokenPipeError traceback, exit 141."""
    import subprocess
    import sys

    proc = subprocess.run(
        ["bash", "-c", f"'{sys.executable}' -m quantship targets | head -c 1 >/dev/null; echo ${{PIPESTATUS[0]}}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() in {"0", "141"}, proc.stdout
