"""Load a model: a registry architecture with the user's weights, or a whole model from a file.

Accepted weight sources: ``.keras`` archives, ``.weights.h5``, legacy Keras-2 ``.h5`` (full model or weights
only) and SavedModel directories; ``pretrained`` (built-in weights) and ``random`` (no weights, for latency).
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantship.config import PreprocessSpec
from quantship.errors import ConfigError, ModelLoadError
from quantship.fileio import sha256_file
from quantship.lazy import lazy_import
from quantship.models.registry import ModelSpec, get_model_spec
from quantship.models.ssd import l2norm_layer, load_weights_by_name


@dataclass
class LoadedModel:
    """A ready Keras model with what evaluation needs to know about it."""

    name: str
    model: Any
    preprocess: PreprocessSpec
    weights: str
    weights_hash: str
    spec: ModelSpec | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.model.inputs[0].shape[1:])


def _keras():
    return lazy_import("keras", purpose="loading Keras models")


def _is_legacy_full_h5(path: Path) -> bool:
    import h5py  # lazy: ~0.13 s to import, only for .h5 files

    try:
        with h5py.File(path, "r") as f:
            return "model_config" in f.attrs
    except OSError as exc:
        raise ModelLoadError(f"{path}: not a readable HDF5 file ({exc})") from None


def _legacy_custom_objects() -> dict[str, Any]:
    """Keras-2 configs carry arguments Keras 3 refuses (``groups`` on DepthwiseConv2D): accept and drop."""
    keras = _keras()

    class DepthwiseConv2D(keras.layers.DepthwiseConv2D):
        def __init__(self, *args: Any, groups: Any = None, **kwargs: Any):
            super().__init__(*args, **kwargs)

    return {"DepthwiseConv2D": DepthwiseConv2D, "relu6": keras.activations.relu6}


def _load_full_model(path: Path) -> Any:
    keras = _keras()
    try:
        if path.is_dir():
            if not (path / "saved_model.pb").is_file():
                raise ModelLoadError(f"{path}: a directory without saved_model.pb is not a SavedModel")
            layer = keras.layers.TFSMLayer(str(path), call_endpoint="serving_default")
            return layer
        if path.suffix == ".keras":
            if not zipfile.is_zipfile(path):
                raise ModelLoadError(f"{path}: not a .keras archive (truncated or corrupt file)")

            l2norm_layer()  # our custom layers must be registered before Keras reads a config naming them
            return keras.saving.load_model(str(path), compile=False, safe_mode=True)
        # legacy full-model .h5
        try:
            return keras.saving.load_model(str(path), compile=False, custom_objects=_legacy_custom_objects())
        except Exception as exc:  # noqa: BLE001
            tf_keras = None
            try:
                import tf_keras  # type: ignore[no-redef]
            except ImportError:
                pass
            if tf_keras is None:
                raise ModelLoadError(
                    f"{path}: Keras 3 cannot rebuild this Keras-2 model ({exc}); load its weights into a registry "
                    "architecture with --model NAME --weights FILE, or install tf-keras (pip install quantship[legacy])"
                ) from None
            return tf_keras.models.load_model(str(path), compile=False)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - Keras/h5py raise many types for a bad file
        raise ModelLoadError(f"{path}: cannot load model ({_short(exc)})") from None


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _wrap_savedmodel_layer(layer: Any, spec: ModelSpec | None, preprocess: PreprocessSpec) -> Any:
    keras = _keras()
    shape = (*preprocess.size, 3) if spec is None else (*spec.input_size, 3)
    inputs = keras.Input(shape=shape, name="input")
    out = layer(inputs)
    if isinstance(out, dict):
        out = out[sorted(out)[0]]
    return keras.Model(inputs, out, name="savedmodel")


MODEL_FILE_SUFFIXES = (".keras", ".h5")


def check_savedmodel_trust(path: Path, trusted: bool, option: str) -> None:
    """Refuse a SavedModel folder unless the user said it is trusted. A SavedModel is a program: loading it runs
    the operations of its graph (which can read and write files), while ``.keras`` and ``.h5`` files are read as
    data (Keras' safe mode: no Lambda layers, no custom code).

    Raises:
        ConfigError: ``path`` is a folder and ``trusted`` is False.
    """
    if path.is_dir() and not trusted:
        raise ConfigError(
            f"{option} {path}: a SavedModel folder is a program (loading it runs the operations of its graph); "
            "pass --trust-savedmodel if you trust its source, or give the model as .keras / .h5"
        )


def is_model_file(model: str) -> bool:
    """Whether ``--model`` names a model file or SavedModel folder rather than a registry architecture (the one
    place this is decided): a known model-file suffix, a path separator, or something that exists on disk."""
    path = Path(model).expanduser()
    return path.suffix.lower() in MODEL_FILE_SUFFIXES or os.sep in model or path.exists()


def resolve_preprocess(
    model: str, weights: str | None = None, overrides: dict[str, Any] | None = None
) -> PreprocessSpec:
    """The complete preprocessing of a model, with one precedence (as timm's ``resolve_data_config``):
    user overrides > the spec that belongs to the weights (a pretrained checkpoint's own preprocessing) > the
    architecture's registry default. A model given as a file has no defaults: ``--preprocess`` must describe
    its input (overrides on :class:`PreprocessSpec`'s defaults).

    Raises:
        ConfigError: Unknown registry model or option, or a model file without overrides.
    """
    overrides = dict(overrides or {})
    if is_model_file(model):
        if not overrides:
            raise ConfigError(f"{model}: a model given as a file needs --preprocess (e.g. mode=tf,size=224)")
        return PreprocessSpec().with_overrides(**overrides)
    spec = get_model_spec(model)
    base = spec.preprocess
    if spec.weights_preprocess is not None and spec.pretrained is not None and weights in (None, "pretrained"):
        base = spec.weights_preprocess
    return base.with_overrides(**overrides) if overrides else base


def model_name(model: str) -> str:
    """The name a loaded model carries (in rows, state folders and artifact names), without loading it: the file
    stem of a model file, the registry name otherwise."""
    return Path(model).expanduser().stem if is_model_file(model) else get_model_spec(model).name


def load_model(
    model: str,
    weights: str | os.PathLike | None = None,
    preprocess: PreprocessSpec | None = None,
    num_classes: int | None = None,
    trust_savedmodel: bool = False,
) -> LoadedModel:
    """Build or load a Keras model.

    Args:
        model: Registry name, or the path of a full model (``.keras``, full ``.h5``, SavedModel dir).
        weights: Weights for a registry model: a file, ``pretrained`` (default when the model has built-in
            weights) or ``random``.
        preprocess: Preprocessing to use; by default :func:`resolve_preprocess` without overrides.
        num_classes: Classifier width when it differs from the registry default.
        trust_savedmodel: Allow a SavedModel folder (loading one runs its graph's operations).

    Raises:
        ConfigError: Unknown model, a path model without preprocessing, or a SavedModel not trusted.
        ModelLoadError: Unreadable file, or weights that do not fit the architecture.
    """
    if is_model_file(model):
        path = Path(model).expanduser()
        if not path.exists():
            raise ModelLoadError(f"model file not found: {path}")
        check_savedmodel_trust(path, trust_savedmodel, "--model")
        preprocess = preprocess or resolve_preprocess(model, weights)
        loaded = _load_full_model(path)
        if not hasattr(loaded, "inputs"):
            loaded = _wrap_savedmodel_layer(loaded, None, preprocess)
        return LoadedModel(model_name(model), loaded, preprocess, str(path), sha256_file(path)[:16])
    spec = get_model_spec(model)
    pre = preprocess or resolve_preprocess(model, None if weights is None else str(weights))
    build_kwargs: dict[str, Any] = {"num_classes": num_classes or spec.num_classes}
    if pre.size != spec.input_size:
        build_kwargs["input_shape"] = (*pre.size, 3)
    if weights is not None and str(weights) == "random":
        keras_model = spec.build(**build_kwargs)
        return LoadedModel(spec.name, keras_model, pre, "random", weights_fingerprint(keras_model), spec)
    wpath = _weights_path(spec, weights)
    check_savedmodel_trust(wpath, trust_savedmodel, "--weights")
    name = wpath.name
    is_full = name.endswith(".keras") or (
        name.endswith(".h5") and not name.endswith(".weights.h5") and _is_legacy_full_h5(wpath)
    )
    if wpath.is_dir() or is_full:
        keras_model = _load_full_model(wpath)
        if not hasattr(keras_model, "inputs"):
            keras_model = _wrap_savedmodel_layer(keras_model, spec, pre)
        _check_fits(keras_model, spec, pre, wpath)
    elif name.endswith(".h5"):
        keras_model = spec.build(**build_kwargs)
        _load_weights_into(keras_model, spec, wpath)
    else:
        raise ModelLoadError(f"{wpath}: unsupported weights file (use .keras, .weights.h5, .h5 or a SavedModel dir)")
    return LoadedModel(spec.name, keras_model, pre, str(wpath), sha256_file(wpath)[:16], spec)


def weights_file(model: str, weights: str | os.PathLike | None) -> Path:
    """The weights file a registry model loads (``pretrained`` resolves to the built-in weights)."""
    return _weights_path(get_model_spec(model), weights)


def _weights_path(spec: ModelSpec, weights: str | os.PathLike | None) -> Path:
    """The weights file of a registry model: the given file, or the built-in weights (``pretrained``, the
    default where there are any)."""
    if weights is None or str(weights) == "pretrained":
        if spec.pretrained is None:
            raise ConfigError(
                f"model '{spec.name}' has no built-in weights here; pass --weights FILE (or --weights random to "
                "measure latency with untrained weights)"
            )
        wpath = Path(spec.pretrained())
    else:
        wpath = Path(weights).expanduser()
    if not wpath.exists():
        raise ModelLoadError(f"weights file not found: {wpath}")
    return wpath


def _load_weights_into(keras_model: Any, spec: ModelSpec, wpath: Path) -> None:
    """Weights-only ``.h5`` / ``.weights.h5`` into the architecture, refusing any mismatch."""
    if spec.task == "detection" and not wpath.name.endswith(".weights.h5"):
        # Detection weight files of the Keras SSD implementation are matched by layer name.
        load_weights_by_name(keras_model, wpath)
        return
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            keras_model.load_weights(str(wpath))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{wpath}: weights do not fit {spec.name}: {_short(exc)}") from None
    # Keras warns, rather than fails, when it skips layers it finds no weights for: those layers would keep
    # their random initial values, so treat it as the mismatch it is.
    pattern = r"[Ss]kipping|freshly-initialized|not loaded|mismatch"
    skipped = [str(w.message) for w in caught if re.search(pattern, str(w.message))]
    if skipped:
        raise ModelLoadError(f"{wpath}: weights do not fit {spec.name}: {skipped[0].splitlines()[0][:300]}")


def _check_fits(model: Any, spec: ModelSpec, pre: PreprocessSpec, path: Path) -> None:
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or (shape[0] is not None and tuple(shape[:2]) != tuple(pre.size)):
        raise ModelLoadError(
            f"{path}: the model takes input {shape}, but {spec.name} is evaluated at {pre.size}; give matching "
            "--preprocess size=..."
        )


def weights_fingerprint(model: Any) -> str:
    """Hash of a model's weight values (for models not loaded from a file)."""

    h = hashlib.sha256()
    for w in model.weights:
        h.update(np.asarray(w).tobytes())
    return h.hexdigest()[:16]
