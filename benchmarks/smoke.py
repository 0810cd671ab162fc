"""What the benchmarks' ``--smoke`` modes share: a tiny model and a few images.

A smoke run proves that a script still runs end to end against today's package (imports, signatures, every phase
once) in seconds; its figures mean nothing. ``tests/test_benchmarks.py`` runs every script's smoke mode.
"""

from __future__ import annotations

from pathlib import Path

SIZE = 32
PREPROCESS = "mode=tf,size=32,crop_pct=1.0"  # what --preprocess would say for the tiny model


def tiny_model(folder: Path, classes: int = 1000) -> str:
    """A random-weight CNN (32x32 RGB in, ``classes`` softmax outputs, every layer kind the converters treat
    specially: convolution, depthwise, pooling, dense) saved as ``folder/smoke-tiny.keras``; returns its path."""
    path = Path(folder) / "smoke-tiny.keras"
    if path.is_file():
        return str(path)
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3), name="input")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="dw1")(x)
    x = keras.layers.Conv2D(16, 1, activation="relu", name="pw1")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(classes, name="logits")(x)
    outputs = keras.layers.Activation("softmax", name="probs")(x)
    path.parent.mkdir(parents=True, exist_ok=True)
    keras.Model(inputs, outputs, name="smoke_tiny").save(path)
    return str(path)


def preprocess_for(model: str):
    """The preprocessing of ``model``: the tiny model's for a model file (a file carries none), else None (the
    registry's)."""
    from quantship.config import PreprocessSpec, parse_preprocess_overrides
    from quantship.models.loading import is_model_file

    if not is_model_file(model):
        return None
    return PreprocessSpec().with_overrides(**parse_preprocess_overrides(PREPROCESS))


def load(model: str, weights: str | None):
    """``load_model`` for a registry name or the tiny model's file."""
    from quantship.models.loading import is_model_file, load_model

    return load_model(model, None if is_model_file(model) else weights, preprocess_for(model))


def demo_artifacts(work: Path, targets: str, threads: int, smoke: bool = False) -> dict[str, str]:
    """EfficientNet-Lite0's ``targets`` (pretrained weights) calibrated on the demo photos, or with ``smoke`` the
    tiny random model's calibrated on 4 of them: ``{target: artifact path}`` (the latency benchmarks' inputs).
    Exits naming the targets that failed to build."""
    from quantship.config import CalibrationSpec, parse_preprocess_overrides
    from quantship.jobs.convert import ConvertSpec, convert_artifacts
    from quantship.jobs.demo import write_demo_data

    _, calib = write_demo_data(work / "demo")
    n = 4 if smoke else len(list(calib.glob("*.png")))
    built, failures = convert_artifacts(
        ConvertSpec(
            tiny_model(work) if smoke else "efficientnet_lite0",
            targets,
            work / "artifacts",
            weights=None if smoke else "pretrained",
            data=f"imagenet:{calib}",
            calibration=CalibrationSpec(num_images=n),
            threads=threads,
            preprocess_overrides=parse_preprocess_overrides(PREPROCESS) if smoke else None,
        )
    )
    if failures:
        raise SystemExit("; ".join(f"{name}: {error}" for name, error in failures.items()))
    return {name: str(a.path) for name, a in built.items() if a is not None}
