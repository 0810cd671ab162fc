"""What the bad-input rows share: the data and models, built once per session for every command's file."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import write_synset_dataset


@pytest.fixture(scope="session")
def data_env(tmp_path_factory) -> dict:
    """What every row shares: a 6-image dataset, and a model path for the rows refused before a model is read."""
    root = tmp_path_factory.mktemp("bad-inputs")
    placeholder = root / "tiny.keras"
    placeholder.write_bytes(b"never read: refused before any model is loaded")
    return {"model": placeholder, "data": write_synset_dataset(root / "data", 2, seed=3)}


@pytest.fixture(scope="session")
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
