"""What the registries own, checked over every entry: the runtime registry's facts (availability, row fields, the
one list of tool distributions) and the contract every registered runner and target keeps."""

from __future__ import annotations

import importlib.metadata

import pytest

from quantship.runtime.registry import list_runtimes, tool_distributions


def test_the_one_tool_list_holds_the_decoders_and_every_runtimes_libraries():
    names = tool_distributions()
    assert len(names) == len(set(names))
    for decoder in ("opencv-python", "opencv-python-headless", "pillow"):
        assert decoder in names, f"{decoder} decodes every input: its version belongs to every key"
    for info in list_runtimes():
        assert set(info.distributions) <= set(names), info.name


@pytest.mark.parametrize("decoder", ["pillow", "opencv-python-headless", "opencv-python"])
def test_a_decoder_upgrade_changes_the_signoff_unit_key(synset_dataset, monkeypatch, decoder):
    from quantship.data.datasets import load_dataset, split_calibration
    from quantship.models.loading import resolve_preprocess
    from quantship.signoff.plan import SignoffPlan
    from quantship.signoff.units import unit_inputs, unit_key

    plan = SignoffPlan.from_dict(
        {
            "name": "keys",
            "dataset": f"imagenet:{synset_dataset}",
            "models": [{"name": "mobilenet_v2", "weights": "random"}],
            "targets": ["tflite-fp32"],
            "gates": [{"metric": "top1", "max_drop_points": 5}],
        }
    )
    entry = plan.models[0]
    calib, evalset = split_calibration(load_dataset(plan.data), 0, 8, 0)
    preprocess = resolve_preprocess(entry.name, entry.weights, entry.preprocess)

    def key() -> str:
        return unit_key(plan, entry, "tflite-fp32", unit_inputs(plan, entry, preprocess, evalset, calib))

    before = key()
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "999.0" if name == decoder else real(name))
    assert key() != before, f"a new {decoder} (new pixels) must not reuse stored results"
    monkeypatch.undo()
    assert key() == before
