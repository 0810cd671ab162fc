"""What the registries own, checked over every entry: the runtime registry's facts (availability, row fields, the
one list of tool distributions) and the contract every registered runner and target keeps."""

from __future__ import annotations

import importlib.metadata

import numpy as np
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


# ------------------------------------------------------------------------- every target, every runner


def _targets() -> list[str]:
    from quantship.targets import list_targets

    return [t.name for t in list_targets()]


def _runtimes() -> list[str]:
    return [info.name for info in list_runtimes()]


def _skip_unless_installed(backend: str) -> None:
    from quantship.runtime.registry import get_runtime

    info = get_runtime(backend)
    if not info.available():
        pytest.skip(f"runtime '{backend}' ({info.description}) is not installed on this machine")


@pytest.fixture(scope="module")
def built(trained_tiny, tmp_path_factory):
    """Every registered target whose runtime is installed, built from the tiny model in ONE context (one ONNX
    export and one statistics pass serve every calibrated target, as in a run); and the fp32 reference."""
    from conftest import synthetic_set, tf_preprocess
    from quantship.config import parse_preprocess_overrides
    from quantship.models.loading import resolve_preprocess
    from quantship.runtime.base import RunnerOptions
    from quantship.runtime.registry import get_runtime
    from quantship.targets import BuildContext, CalibrationData, list_targets
    from quantship.targets.run import load_for

    model, path = trained_tiny
    pre = resolve_preprocess(str(path), None, parse_preprocess_overrides("mode=tf,size=32,crop_pct=1.0"))
    loaded = load_for(str(path), None, pre)
    calib = tf_preprocess(synthetic_set(8, seed=21)[0])
    x = tf_preprocess(synthetic_set(4, seed=22)[0])
    batches = [calib[i : i + 8] for i in range(0, len(calib), 8)]
    ctx = BuildContext(
        loaded,
        tmp_path_factory.mktemp("every-target"),
        calibration=CalibrationData(lambda: batches, {"images": len(calib)}),
        runner_options=RunnerOptions(threads=1),
    )
    artifacts = {}
    for t in list_targets():
        if get_runtime(t.spec.backend).available():
            artifacts[t.name] = t.build(ctx, t.spec)
    yield ctx, artifacts, x, model.predict(x, verbose=0)
    ctx.close()


@pytest.mark.parametrize("name", _targets())
def test_every_registered_target_builds_and_runs(built, name):
    from quantship.targets import get_target

    target = get_target(name)
    _skip_unless_installed(target.spec.backend)
    ctx, artifacts, x, reference = built
    artifact = artifacts[name]
    if artifact is not None:  # in-memory runtimes (Keras) have none
        assert artifact.path.exists() and artifact.manifest_path.is_file()
        assert artifact.manifest["sha256"] and set(tool_distributions()) >= set(artifact.manifest["tools"]) - {"python"}
    with target.make_runner(ctx, artifact) as runner:
        (probs,) = runner.infer(x).values()
    assert probs.dtype == np.float32 and probs.shape == reference.shape and np.isfinite(probs).all()
    # Every target approximates the model it was built from: the same top-1 on most images, probabilities close.
    agree = float(np.mean(probs.argmax(1) == reference.argmax(1)))
    assert agree >= 0.75 and float(np.abs(probs - reference).max()) < 0.35, (agree, np.abs(probs - reference).max())


def _representative(backend: str) -> str:
    """The target a runtime's contract is checked on: its first int8 target (integer I/O where it has one)."""
    from quantship.config import Precision
    from quantship.targets import list_targets

    mine = [t for t in list_targets() if t.spec.backend == backend]
    int8 = [t for t in mine if t.spec.precision is Precision.INT8]
    return (int8 or mine)[0].name


@pytest.mark.parametrize("runtime", _runtimes())
def test_every_runner_keeps_the_runner_contract(built, runtime):
    """What callers rely on, the same for every runtime: state checks before activation, metadata, float in and
    float out whatever the model's I/O types, both times recorded, one typed error for a bad feed, and a context
    manager that deactivates."""
    from quantship.errors import RuntimeBackendError
    from quantship.targets import get_target

    _skip_unless_installed(runtime)
    ctx, artifacts, x, reference = built
    target = get_target(_representative(runtime))
    runner = target.make_runner(ctx, artifacts[target.name])
    with pytest.raises(RuntimeBackendError, match="activate"):
        runner.infer(x)
    with pytest.raises(RuntimeBackendError, match="activate"):
        runner.input_metadata()
    with runner:
        assert runner.is_active
        (inp,) = runner.input_metadata()
        outs = runner.output_metadata()
        assert inp.shape[1:] == x.shape[1:] and len(outs) == 1
        got = runner.infer({inp.name: x})
        assert list(got) == [outs[0].name] and got[outs[0].name].dtype == np.float32
        assert got[outs[0].name].shape == reference.shape
        assert runner.last_query_time > 0 and 0 < runner.last_inference_time <= runner.last_query_time
        bare = runner.infer(x)[outs[0].name]  # a bare array for a single-input model
        np.testing.assert_array_equal(bare, got[outs[0].name])
        with pytest.raises(RuntimeBackendError, match="wrong shape"):
            runner.infer(x[:, :-1])
        with pytest.raises(RuntimeBackendError, match="unknown"):
            runner.infer({"nope": x})
        providers = runner.active_providers
        assert providers is None or (isinstance(providers, list) and providers), providers
    assert not runner.is_active
