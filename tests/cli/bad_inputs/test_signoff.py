"""Bad input to ``quantship signoff``: one row per case (see :mod:`bad_inputs.table`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bad_inputs.table import Case, broken_images, model_edit, params, plan, run_case, savedmodel_folder, signoff_ran

CASES = [
    # --- sign-off plans: checked whole when loaded
    Case(
        "plan-not-utf8",
        ("signoff", "{plan}", "--out", "{out}"),
        2,
        "plan.yaml:2: not UTF-8",
        build=plan(raw=b"name: x\nmodels: [caf\xe9]\n"),
        subprocess=True,
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
            ("gates", [{"metric": "mAP", "relative": 0.9}], "gates[0] (mAP): metric 'mAP' is not measured for a"),
            # label-free gates: direction, range and the data they need
            ("gates", [{"metric": "pseudo_map", "relative": 0.9}], "(pseudo_map is a detection metric)"),
            ("gates", [{"metric": "agreement_top1", "max": 0.5}], "agreement_top1 must be high, so it takes min"),
            ("gates", [{"metric": "mean_l1", "min": 0.1}], "mean_l1 is a distance (lower is better"),
            ("gates", [{"metric": "mean_l1", "relative": 0.9}], "gate it with max, e.g. {{metric: mean_l1, max: 0.3}}"),
            ("gates", [{"metric": "mean_l1", "max": 3.0}], "gates[0] (mean_l1): mean_l1 lies in [0, 2]; got 3"),
            ("gates", [{"metric": "mean_l1", "max": -0.1}], "mean_l1 lies in [0, 2]; got -0.1"),
            ("gates", [{"metric": "mean_kl", "max": float("nan")}], "gates[0].max: expected a number, got nan"),
            ("gates", [{"metric": "mean_kl", "max": "low"}], "gates[0].max: expected a number, got 'low'"),
            ("gates", [{"metric": "agreement_top1", "min": 1.5}], "agreement_top1 lies in [0, 1]; got 1.5"),
            ("gates", [{"metric": "agreement_top1", "relative": 1.2}], "relative must be at most 1 for agreement"),
            ("gates", [{"metric": "agreement_top5", "max_drop_points": 101}], "max_drop_points must be in [0, 100]"),
            ("gates", [{"metric": "mean_l1", "max": 0.3, "min": 0.1}], "give exactly one of 'relative'"),
            ("gates", [{"metric": "top1", "relative": 0.9, "score_threshold": 0.5}], "applies only to pseudo_map"),
            ("gates", [{"metric": "mean_l1", "max": 1e300}], "mean_l1 lies in [0, 2]; got 1e+300"),
            ("gates", [{"metric": "", "relative": 0.9}], "gate metric must be a metric name"),
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
            ("remote", {"url": "ssh://pi", "timeout": 0}, "remote: timeout: expected seconds in (0, 604800]"),
            ("remote", {"url": "ssh://pi", "timeout": "soon"}, "timeout: expected seconds in (0, 604800]"),
            ("remote", {"url": "ssh://pi", "timeout": True}, "timeout: expected seconds in (0, 604800]"),
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
        "plan-labelled-gate-on-images",
        ("signoff", "{plan}", "--out", "{out}"),
        2,
        "gates[0] (top1): metric 'top1' needs labels and the evaluation data has none (images:)",
        build=lambda tmp, env: plan({"dataset": f"images:{env['data']}"})(tmp, env),
    ),
    Case(
        "plan-images-folder-unreadable",
        ("signoff", "{plan}", "--out", "{out}"),
        2,
        "none of the 2 image file(s) could be read as an image",
        build=lambda tmp, env: {
            **broken_images(tmp),
            **plan({"dataset": f"images:{tmp / 'broken'}", "gates": [{"metric": "agreement_top1", "min": 0.9}]})(
                tmp, env
            ),
        },
    ),
    Case(
        "plan-string-forms-accepted",
        ("signoff", "{plan}", "--out", "{out}", "-q"),
        0,
        "1 of 1 gates",  # PASS, underpowered or not: the few test images decide that
        frozenset(
            {"signoff.jsonl", "verdicts.jsonl", "agreement.jsonl", "environment.json", "plan.json", "report.md"}
            | {"report.html"}
            | {"report_chart.png", "artifacts", "state"}
        ),
        plan({"targets": "tflite-fp32", "gates": [{"relative": 0.9, "targets": "tflite-*"}]}),
        heavy=True,
        check=signoff_ran,
    ),
    Case(
        "plan-remote-with-ray",
        ("signoff", "{plan}", "--out", "{out}"),
        2,
        "remote: a run on a remote device goes through the local executor: drop executor: ray",
        build=plan({"remote": "ssh://pi", "executor": "ray"}),
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
        heavy=True,
    ),
    Case(
        "plan-ort-providers-unavailable-unused",
        ("signoff", "{plan}", "--out", "{out}", "-q"),
        0,
        "1 of 1 gates",  # PASS, underpowered or not: the few test images decide that
        frozenset(
            {"signoff.jsonl", "verdicts.jsonl", "agreement.jsonl", "environment.json", "plan.json", "report.md"}
            | {"report.html"}
            | {"report_chart.png", "artifacts", "state"}
        ),
        plan({"ort_providers": ["cuda"]}),
        heavy=True,
        check=signoff_ran,
    ),
    Case(
        "signoff-out-inside-plan-dataset",
        ("signoff", "{plan}", "--out", "{out}"),
        2,
        "is inside the data folder of the plan's dataset",
        build=lambda tmp, env: {**plan()(tmp, env), "out": str(Path(env["data"]) / "results")},
    ),
    Case(
        "ray-address-empty",
        ("signoff", "{plan}", "--ray-address", "", "--out", "{out}"),
        2,
        "argument --ray-address: expected the Ray head's HOST:PORT, got an empty text",
        build=plan(),
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case: Case, request, tmp_path, capfd):
    run_case(case, request, tmp_path, capfd)
