"""Model registry, MAC counts, and loading user weights in every supported format."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from quantship.errors import ConfigError, ModelLoadError
from quantship.jobs.listing import ModelStats, committed_model_stats, measure_model_stats, model_table_path
from quantship.models import get_model_spec, list_models
from quantship.models.loading import load_model
from quantship.models.stats import count_macs

SMALL = "mobilenet_0.25_128"
TABLE = committed_model_stats()


@pytest.mark.slow
@pytest.mark.parametrize("name", [m.name for m in list_models()])
def test_every_registered_model_builds_at_its_input_size(name):
    import keras

    spec = get_model_spec(name)
    model = spec.build()
    assert tuple(model.inputs[0].shape[1:3]) == spec.input_size
    if spec.task == "detection":
        from quantship.models.ssd import make_anchors

        assert model.outputs[0].shape[1:] == (
            len(make_anchors(spec.extra["anchors"](spec.num_classes))),
            spec.num_classes + 4,
        )
    else:
        assert model.outputs[0].shape[-1] == spec.num_classes
    assert spec.preprocess.size == spec.input_size
    # `quantship models` prints the committed counts: they must be this model's (every model, so slow).
    assert TABLE[name] == ModelStats(spec.input_size, int(model.count_params()), count_macs(model)), (
        f"{name}: its row in {model_table_path()} is stale; rewrite the table with write_model_table()"
    )
    keras.backend.clear_session()


def test_every_registered_model_has_a_row_in_the_committed_table():
    """`quantship models` reads parameters and MACs from a committed table: a model added to the registry without
    a row, or a row left behind by a removed model, fails here (no model is built)."""
    registered = {spec.name: spec for spec in list_models()}
    assert not registered.keys() - TABLE.keys(), (
        f"models without a row in {model_table_path()}: {sorted(registered.keys() - TABLE.keys())}; run "
        "python -c 'from quantship.jobs.listing import write_model_table; write_model_table()'"
    )
    assert not TABLE.keys() - registered.keys(), f"rows of unregistered models: {sorted(TABLE.keys() - registered)}"
    assert {n: TABLE[n].input for n in TABLE} == {n: s.input_size for n, s in registered.items()}


@pytest.mark.parametrize("name", [SMALL, "squeezenet_v1_1"])
def test_committed_row_of_a_small_model_is_what_building_it_counts(name):
    assert measure_model_stats(get_model_spec(name)) == TABLE[name]


def test_models_lists_the_committed_counts_without_building(tmp_path):
    """The default listing, through the real parser, imports no heavy library (so it builds nothing)."""
    code = (
        "import sys\nfrom quantship.cli import main\nrc = main(['models'])\n"
        "print('HEAVY', sorted(m for m in ('tensorflow', 'keras', 'onnxruntime') if m in sys.modules), rc)"
    )
    env = {**os.environ, "QUANTSHIP_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("HEAVY [] 0"), out.stdout[-500:]
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:] if line.strip()}
    for name, stats in TABLE.items():
        assert rows[name][3:5] == [f"{stats.params / 1e6:.2f}M", f"{stats.macs / 1e6:.0f}M"], rows[name]
    assert not list(tmp_path.iterdir()), "the listing wrote to the cache: it counted something"


def test_models_flags_a_model_without_a_row_and_live_stats_counts_it(monkeypatch, capsys, tmp_path):
    """A model registered outside the package has no committed row: the listing says so (no stale or made-up
    figure), and `--live-stats` builds it and counts it."""
    from quantship.cli import main
    from quantship.jobs import listing
    from quantship.models.registry import ModelSpec

    small = get_model_spec(SMALL)
    plugin = ModelSpec(**{**{f: getattr(small, f) for f in small.__dataclass_fields__}, "name": "plugin_net"})
    monkeypatch.setattr(listing, "registered_models", lambda: [small, plugin])
    monkeypatch.setenv("QUANTSHIP_CACHE", str(tmp_path))
    monkeypatch.setattr("quantship.models.registry._MODELS", {SMALL: small, "plugin_net": plugin})

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "no committed parameter/MAC counts for plugin_net" in out
    assert out.splitlines()[3].split()[3:5] == ["-", "-"]

    assert main(["models", "--live-stats"]) == 0
    live = capsys.readouterr().out.splitlines()
    want = [f"{TABLE[SMALL].params / 1e6:.2f}M", f"{TABLE[SMALL].macs / 1e6:.0f}M"]
    assert live[2].split()[3:5] == want and live[3].split()[:1] == ["plugin_net"] and live[3].split()[3:5] == want


# Published multiply-accumulates (MobileNet paper / TF release table, SqueezeNet v1.1 release notes) and
# the rounding they were published with.
@pytest.mark.parametrize(
    "name,macs,unit",
    [
        ("mobilenet_1.0_224", 569e6, 1e6),
        ("mobilenet_0.25_128", 14e6, 1e6),
        ("mobilenet_1.0_128", 186e6, 1e6),
        ("squeezenet_v1_1", 352e6, 5e6),
    ],
)
def test_mac_counts_match_published_figures(name, macs, unit):
    model = get_model_spec(name).build()
    assert abs(count_macs(model) - macs) <= unit


def test_unknown_model_suggests_names():
    with pytest.raises(ConfigError, match="unknown model 'mobilenet_9'.*mobilenet_"):
        get_model_spec("mobilenet_9")


def test_model_without_builtin_weights_needs_weights():
    with pytest.raises(ConfigError, match="--weights"):
        load_model(SMALL)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A registry model with random weights, saved in every format users have."""
    import h5py
    import keras

    keras.utils.set_random_seed(1)
    model = get_model_spec(SMALL).build()
    root = tmp_path_factory.mktemp("weights")
    model.save(root / "full.keras")
    model.save_weights(root / "w.weights.h5")
    model.save(root / "full.h5")  # legacy HDF5 full model
    # A Keras-2 file: legacy HDF5 whose config carries DepthwiseConv2D's `groups` (Keras 3 refuses it).
    keras2 = root / "keras2.h5"
    keras2.write_bytes((root / "full.h5").read_bytes())
    with h5py.File(keras2, "r+") as f:
        cfg = json.loads(f.attrs["model_config"])
        for layer in cfg["config"]["layers"]:
            if layer["class_name"] == "DepthwiseConv2D":
                layer["config"]["groups"] = 1
        f.attrs["model_config"] = json.dumps(cfg)
    # Legacy weights-only HDF5 (what Keras 2's save_weights('x.h5') wrote).
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(root / "weights_only.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    model.export(str(root / "savedmodel"), format="tf_saved_model", verbose=False)
    x = np.random.default_rng(0).normal(size=(2, 128, 128, 3)).astype(np.float32)
    return model, root, x, model.predict(x, verbose=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fname", ["full.keras", "w.weights.h5", "full.h5", "keras2.h5", "weights_only.h5", "savedmodel"]
)
def test_weights_load_in_every_format(reference, fname):
    _, root, x, expected = reference
    loaded = load_model(SMALL, root / fname, trust_savedmodel=fname == "savedmodel")
    got = np.asarray(loaded.model(x, training=False))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert loaded.weights_hash


@pytest.mark.slow
def test_model_given_as_file_needs_preprocessing(reference):
    from quantship.config import PreprocessSpec

    _, root, x, expected = reference
    with pytest.raises(ConfigError, match="--preprocess"):
        load_model(str(root / "full.keras"))
    loaded = load_model(str(root / "full.keras"), preprocess=PreprocessSpec(size=(128, 128)))
    np.testing.assert_allclose(np.asarray(loaded.model(x)), expected, atol=1e-5)


@pytest.mark.slow
def test_weights_of_another_architecture_are_refused(reference, tmp_path):
    other = get_model_spec("mobilenet_0.5_128").build()
    path = tmp_path / "other.weights.h5"
    other.save_weights(path)
    with pytest.raises(ModelLoadError, match="do not fit mobilenet_0.25_128"):
        load_model(SMALL, path)


@pytest.mark.slow
@pytest.mark.parametrize("fname", ["full.keras", "w.weights.h5", "full.h5"])
def test_truncated_files_are_clear_errors(reference, tmp_path, fname):
    _, root, _, _ = reference
    data = (root / fname).read_bytes()
    cut = tmp_path / fname
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match=str(cut.name)):
        load_model(SMALL, cut)


def test_missing_weights_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(SMALL, tmp_path / "absent.weights.h5")
