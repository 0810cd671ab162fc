"""``--post-training auto``: the tie rule, and the whole search through the real ``eval`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_PREPROCESS
from quantship.config import AdaRoundOptions, PtqSteps
from quantship.targets.post_training import (
    CANDIDATES,
    FIRST_ROUND,
    MAX_CANDIDATES,
    SEARCHED_CALIBRATORS,
    SECOND_ROUND,
    Score,
    choose,
)


def _score(steps: PtqSteps, agree: list[int], l1: list[float]) -> Score:
    a, d = np.array(agree, float), np.array(l1, float)
    return Score(steps, float(a.mean()), float(d.mean()), agree=a, l1=d)


def test_fewer_steps_win_when_the_held_out_images_cannot_tell_them_apart():
    rng = np.random.default_rng(0)
    n = 40
    base_l1 = rng.uniform(0.1, 0.3, n)
    both = PtqSteps(equalize=True, bias_correct=True)
    # one image apart in agreement, L1 lower by less than its noise: not resolved -> none (0 steps) is chosen over
    # both (2 steps), the best-scoring one
    noise = rng.normal(0, 0.02, n)
    noisy = base_l1 + noise - noise.mean() - 0.003
    close = [_score(both, [1] * n, noisy), _score(PtqSteps(), [1] * (n - 1) + [0], base_l1)]
    chosen, reason = choose(close)
    assert chosen.steps == PtqSteps() and "fewer steps" in reason
    # a clear L1 gain on every image is resolved: the better candidate stays, whatever its number of steps
    clear = [_score(both, [1] * n, base_l1 - 0.05), _score(PtqSteps(), [1] * n, base_l1)]
    chosen, reason = choose(clear)
    assert chosen.steps == both and "lowest held-out mean L1" in reason
    # the tie rule swaps steps, never the calibrator: an unresolved simpler candidate of another calibrator stays out
    other = _score(PtqSteps(), [1] * (n - 1) + [0], base_l1)
    other.calibrator = "mse"
    best = _score(both, [1] * n, noisy)
    best.calibrator = "entropy"
    assert choose([best, other])[0] is best
    # a candidate that failed to build is never chosen
    failed = Score(PtqSteps(bias_correct=True), error="conversion failed")
    assert choose([failed, *clear])[0].steps == both


def test_agreement_decides_only_where_the_held_out_images_resolve_it():
    # Lite0's search (25 held-out images): bias correction agreed on all 25, AdaRound on 22 with a lower L1 on
    # every image; 3 images are not a resolved difference, so L1 decides (AdaRound was the better on 300 images)
    n = 25
    l1 = np.linspace(0.1, 0.3, n)
    adaround = _score(PtqSteps(adaround=AdaRoundOptions()), [1] * (n - 3) + [0] * 3, l1 - 0.06)
    bias = _score(PtqSteps(bias_correct=True), [1] * n, l1)
    assert choose([bias, adaround])[0] is adaround
    # 8 images fewer is resolved: that candidate is out however low its L1
    worse = _score(PtqSteps(equalize=True), [1] * (n - 8) + [0] * 8, l1 - 0.09)
    chosen, reason = choose([bias, adaround, worse])
    assert chosen is adaround and "2 candidates" in reason


@pytest.mark.slow
def test_eval_post_training_auto_scores_every_candidate_on_held_out_calibration_images(
    trained_tiny, synset_dataset, tmp_path
):
    from quantship.cli import main

    _, model = trained_tiny
    out = tmp_path / "out"
    argv = ["eval", "--model", str(model), "--preprocess", TINY_PREPROCESS, "--data", f"imagenet:{synset_dataset}"]
    argv += ["--targets", "keras-fp32,tflite-fp32,tflite-int8-max,qdq-int8-auto", "--limit", "12"]
    argv += ["--calib-images", "12", "--post-training", "auto", "--out", str(out), "-q"]
    assert main(argv) == 0
    rows = {r["target"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert "post_training_search" not in json.loads(Path(rows["tflite-fp32"]["manifest"]).read_text())
    for target in ("tflite-int8-max", "qdq-int8-auto"):
        manifest = json.loads(Path(rows[target]["manifest"]).read_text())
        search = manifest["post_training_search"]
        labels = [c["steps"] for c in search["candidates"]]
        assert all(0 <= c["agreement_top1"] <= 1 and c["mean_l1"] >= 0 for c in search["candidates"])
        assert search["chosen"] in labels and search["reason"] and search["seconds"] > 0
        assert (search["held_out_images"], search["fit_images"]) == (3, 9)
        assert manifest["calibration"]["num_images"] == 12  # the drawn set; 9 of them calibrated the candidate
        assert manifest["calibration"]["post_training_search"]["fit_images"] == 9
        assert "post-training-search" in rows[target]["artifact"]
        assert rows[target]["agreement_top1"] >= 0.8
        suffix = "" if search["chosen"] == "none" else f"+{search['chosen']}"
        if target == "tflite-int8-max":  # the calibrator its name fixes, the five steps
            assert labels == [c.label for c in CANDIDATES] and search["chosen_calibrator"] is None
            assert Path(rows[target]["artifact"]).name.startswith(f"tiny-{target}{suffix}.")
            continue
        # calibrator auto: four calibrators without and with equalization + bias correction, then the best one
        # with the other three steps; the row's artifact is the chosen calibrator's
        tried = [(c["calibrator"], c["steps"]) for c in search["candidates"]]
        assert tried[:8] == [(m, s.label) for s in FIRST_ROUND for m in SEARCHED_CALIBRATORS]
        lead = max(search["candidates"][:8], key=lambda c: (c["agreement_top1"], -c["mean_l1"]))["calibrator"]
        assert tried[8:] == [(lead, s.label) for s in SECOND_ROUND] and len(tried) <= MAX_CANDIDATES
        assert (search["chosen_calibrator"], search["chosen"]) in tried
        chosen = f"qdq-int8-{search['chosen_calibrator']}"
        assert Path(rows[target]["artifact"]).name.startswith(f"tiny-{chosen}{suffix}.")


def test_sign_off_unit_keys_carry_adaround_and_auto_and_keep_old_keys():
    """A plan's post-training steps are part of each unit's key (results are never reused across them), and a plan
    without them keeps the key it had before AdaRound and auto existed."""
    import dataclasses

    from quantship.config import AdaRoundOptions, Gate
    from quantship.signoff.plan import PlanModel, SignoffPlan
    from quantship.signoff.units import unit_key

    entry = PlanModel("tiny")
    plan = SignoffPlan(models=(entry,), targets=("tflite-int8",), data="imagenet:/x", gates=(Gate(relative=0.99),))
    keys = {
        label: unit_key(dataclasses.replace(plan, post_training=steps), entry, "tflite-int8", {})
        for label, steps in (
            ("none", PtqSteps()),
            ("adaround", PtqSteps(adaround=AdaRoundOptions())),
            ("adaround-2000", PtqSteps(adaround=AdaRoundOptions(iterations=2000))),
            ("auto", PtqSteps(auto=True)),
            ("equalize", PtqSteps(equalize=True)),
        )
    }
    assert len(set(keys.values())) == len(keys)
    assert PtqSteps(equalize=True).describe() == {"equalize": True, "bias_correct": False, "relu6": "keep"}
    assert keys["none"] == unit_key(plan, entry, "tflite-int8", {})
