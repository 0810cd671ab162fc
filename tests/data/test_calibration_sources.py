"""Calibration from a source of its own: ``images:`` folders, ``--calib-data``, ``--calib-list`` (MLPerf's
format), the disjointness check across sources, and one-line errors (exit code 2) on bad calibration input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_PREPROCESS, encode, synthetic_image, write_synset_dataset
from quantship.cli import main
from quantship.config import CalibrationSpec
from quantship.data.datasets import FileRead, check_disjoint, file_list_hash, load_dataset, select_listed
from quantship.errors import ConfigError, DataError
from quantship.targets.run import calibration_source, draw_listed_calibration, split_run_data


@pytest.fixture(autouse=True)
def _default_input_cache():
    """``main()`` configures the process's input cache from its options: back to the defaults afterwards."""
    yield
    from quantship.config import InputCacheOptions
    from quantship.jobs import use_input_cache

    use_input_cache(InputCacheOptions())


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """(labelled evaluation set of 12, unlabelled calibration folder of 9 in nested folders)."""
    val = write_synset_dataset(tmp_path / "val", 4, seed=7)
    train = tmp_path / "train"
    rng = np.random.default_rng(5)
    for i in range(9):
        d = train / f"part{i % 3}" / ("deep" if i % 2 else "")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"cal_{i:02d}.jpg").write_bytes(encode(synthetic_image(i % 3, rng, size=96)))  # bigger files
    (train / ".hidden").mkdir()
    (train / ".hidden" / "skip.jpg").write_bytes(encode(synthetic_image(0, rng)))
    (train / "notes.txt").write_text("not an image")
    return val, train


def test_images_kind_is_recursive_sorted_unlabelled_and_refused_for_evaluation(folders, tmp_path):
    _, train = folders
    ds = load_dataset(f"images:{train}")
    rel = [Path(s.key).relative_to(train.resolve()).as_posix() for s in ds.samples]
    assert len(ds) == 9 and rel == sorted(rel) and not any(".hidden" in r for r in rel)
    assert not ds.labelled and all(s.label is None for s in ds.samples)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_dataset(f"images:{tmp_path / 'empty'}")
    from quantship.targets.run import load_evaluation_data

    assert not load_evaluation_data(f"images:{train}").labelled  # label-free evaluation data
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="none of the 1 image file"):
        load_evaluation_data(f"images:{broken}")


def test_calibration_list_by_name_or_relative_path(folders, tmp_path):
    val, train = folders
    ds = load_dataset(f"images:{train}")
    listing = tmp_path / "cal.txt"
    listing.write_text("# MLPerf-style list\ncal_00.jpg\npart1/deep/cal_01.jpg 123\n\ncal_05.jpg\n")
    chosen = select_listed(ds, listing)
    assert [Path(s.key).name for s in chosen.samples] == ["cal_00.jpg", "cal_01.jpg", "cal_05.jpg"]
    listing.write_text("cal_00.jpg\nmissing_1.jpg\nmissing_2.jpg\n")
    with pytest.raises(DataError, match="2 of 3 listed file.*missing_1.jpg"):
        select_listed(ds, listing)
    shutil.copy(train / "part0" / "cal_00.jpg", train / "part2" / "cal_00.jpg")
    listing.write_text("cal_00.jpg\n")
    with pytest.raises(DataError, match="matches 2 files"):
        select_listed(load_dataset(f"images:{train}"), listing)
    # convert / calibrate / bench: --data is calibration data, --calib-list restricts it.
    listing.write_text("cal_00.jpg\npart1/deep/cal_01.jpg\ncal_05.jpg\n")
    drawn, source = draw_listed_calibration(ds, 2, 0, str(listing))
    assert len(drawn) == 2 and {Path(s.key).name for s in drawn.samples} < {"cal_00.jpg", "cal_01.jpg", "cal_05.jpg"}
    assert source.info == {"list": str(listing), "list_sha256": file_list_hash(listing)}
    with pytest.raises(DataError, match="3 calibration images, fewer than --calib-images 4"):
        draw_listed_calibration(ds, 4, 0, str(listing))
    # On the evaluation data itself: listed images are calibration only, never evaluated.
    evalset = load_dataset(f"imagenet:{val}")
    names = [Path(s.key).name for s in evalset.samples]
    listing.write_text("\n".join(names[:4]) + "\n")
    spec = CalibrationSpec(num_images=3, list=str(listing))
    source = calibration_source(spec, evalset)
    calib, ev = split_run_data(evalset, spec, source, limit=None, needed=True)
    assert len(calib) == 3 and {Path(s.key).name for s in calib.samples} <= set(names[:4])
    assert [Path(s.key).name for s in ev.samples] == names[4:]
    assert source.info["list_sha256"] and source.info["list"] == str(listing)


def test_disjointness_across_sources_reads_only_size_matches(folders, tmp_path, monkeypatch):
    val, train = folders
    evalset = load_dataset(f"imagenet:{val}")
    calib = load_dataset(f"images:{train}")
    reads: list[Path] = []
    real = FileRead.__call__

    def counting(self):
        reads.append(self.path)
        return real(self)

    monkeypatch.setattr(FileRead, "__call__", counting)
    sizes = {s.path.stat().st_size for s in calib.samples}
    assert not sizes & {s.path.stat().st_size for s in evalset.samples}
    check_disjoint(calib, evalset)  # no two files of equal size: nothing read at all
    assert reads == []
    # A copy of an evaluation image under another name in the calibration folder: same bytes, refused.
    dup = train / "part0" / "copy_of_val.jpg"
    dup.write_bytes(evalset.samples[5].path.read_bytes())
    calib = load_dataset(f"images:{train}")
    with pytest.raises(DataError, match="also evaluation images.*disjoint"):
        check_disjoint(calib, evalset)
    assert set(reads) == {dup, evalset.samples[5].path}  # only the two files of equal size
    # The same folder as both sources: the same files, refused on the keys alone.
    spec = CalibrationSpec(num_images=4, data=f"images:{val}")
    with pytest.raises(DataError, match="also evaluation images"):
        split_run_data(evalset, spec, calibration_source(spec, evalset), limit=None, needed=True)


def _eval(capsys, tmp_path, data, *extra):
    code = main(
        [
            "eval",
            "--model",
            "mobilenet_0.25_128",
            "--weights",
            "random",
            "--data",
            data,
            "--targets",
            "keras-fp32,tflite-int8",
            "--out",
            str(tmp_path / "o"),
            "-v",
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_bad_calibration_input_is_one_line_exit_2_before_any_work(capsys, folders, tmp_path):
    val, train = folders
    (tmp_path / "empty").mkdir()
    listing = tmp_path / "cal.txt"
    listing.write_text("cal_00.jpg\nnot_there.jpg\n")
    cases = [
        (("--calib-data", f"images:{tmp_path / 'empty'}"), "no images"),
        (("--calib-data", f"images:{train}", "--calib-list", str(listing)), "not found in"),
        (("--calib-data", f"images:{train}", "--calib-list", str(tmp_path / "nope.txt")), "list not found"),
        (("--calib-data", f"images:{train}", "--calib-images", "10"), "fewer than --calib-images 10"),
        (("--calib-data", f"images:{val}", "--calib-images", "4"), "also evaluation images"),
        (("--input-cache", str(listing)), "--input-cache"),
    ]
    for extra, message in cases:
        code, err = _eval(capsys, tmp_path, f"imagenet:{val}", *extra)
        assert code == 2 and len(err) == 1 and message in err[0], (extra, err)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"\x89PNG broken")
    code, err = _eval(capsys, tmp_path, f"images:{tmp_path / 'broken'}")
    assert code == 2 and len(err) == 1 and "could be read as an image" in err[0]
    assert not (tmp_path / "o" / "artifacts").exists()  # nothing was built


@pytest.mark.slow
def test_eval_with_separate_calibration_data_and_list(trained_tiny, folders, tmp_path, monkeypatch):
    """--calib-data + --calib-list: every image of --data evaluated, the manifest records the source, the
    list's hash and the count; the second run reads every image from the input cache."""
    _, model_path = trained_tiny
    val, train = folders
    listing = tmp_path / "cal.txt"
    listing.write_text("cal_00.jpg\ncal_01.jpg\ncal_02.jpg\ncal_03.jpg\n")
    cache = tmp_path / "inputs"
    argv = [
        "eval",
        "--model",
        str(model_path),
        "--preprocess",
        TINY_PREPROCESS,
        "--data",
        f"imagenet:{val}",
        "--calib-data",
        f"images:{train}",
        "--calib-list",
        str(listing),
        "--calib-images",
        "3",
        "--targets",
        "keras-fp32,tflite-int8",
        "--input-cache",
        str(cache),
        "--threads",
        "1",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert [r["images"] for r in rows] == [12, 12]  # every evaluation image, none lost to calibration
    assert all(r["calibration_images"] == 3 and r["calibration_source"] == str(train) for r in rows)
    manifest = json.loads((tmp_path / "o" / "artifacts" / "tiny-tflite-int8.tflite.json").read_text())
    cal = manifest["calibration"]
    assert cal["num_images"] == 3 and cal["source"] == str(train) and cal["list"] == str(listing)
    assert len(cal["list_sha256"]) == 16 and rows[1]["calibration_list_sha256"] == cal["list_sha256"]
    # Second run: evaluation and calibration images all come from the cache (no image decoded).
    from quantship.data import datasets

    monkeypatch.setattr(datasets, "image_views", lambda *a, **k: pytest.fail("decoded despite the cache"))
    (tmp_path / "o" / "artifacts" / "tiny-tflite-int8.tflite.json").unlink()  # rebuild: calibrates again
    assert main(argv) == 0
    again = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert [r["top1"] for r in again] == [r["top1"] for r in rows]


def test_signoff_plan_calibration_data_and_list(folders, tmp_path):
    from quantship.signoff.plan import SignoffPlan
    from quantship.signoff.units import plan_data
    from quantship.targets import parse_targets

    val, train = folders
    listing = tmp_path / "cal.txt"
    listing.write_text("cal_00.jpg\ncal_03.jpg\ncal_04.jpg\n")
    plan = {
        "models": ["mobilenet_v2"],
        "targets": ["tflite-int8"],
        "dataset": f"imagenet:{val}",
        "gates": [{"metric": "top1", "relative": 0.99}],
        "calibration": {"num_images": 2, "data": f"images:{train}", "list": str(listing)},
    }
    targets = parse_targets(["keras-fp32", "tflite-int8"])
    dataset, split = plan_data(SignoffPlan.from_dict(plan), targets)
    assert len(split.evalset) == len(dataset) == 12 and len(split.calib) == 2
    assert {Path(s.key).name for s in split.calib.samples} < {"cal_00.jpg", "cal_03.jpg", "cal_04.jpg"}
    assert split.source.separate and split.source.info["list"] == str(listing)
    with pytest.raises(ConfigError, match=r"gates\[0\] \(top1\): metric 'top1' needs labels"):
        SignoffPlan.from_dict({**plan, "dataset": f"images:{train}"})
