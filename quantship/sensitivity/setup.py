"""What every analysis of one model shares: the model, its calibration and held-out images, the fp32 outputs,
the ONNX export, and the backends built from them once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from quantship.calibrate.api import calibrate
from quantship.config import CalibrationMethod, CalibrationSpec
from quantship.convert.calibrated import collect_statistics
from quantship.convert.onnx import convert_to_onnx, onnx_node_layers
from quantship.convert.tflite import TfliteConverter
from quantship.data.datasets import iter_batches, split_calibration
from quantship.errors import DataError
from quantship.evaluate.tasks import make_task
from quantship.models.loading import resolve_preprocess
from quantship.sensitivity.backends import QdqBackend, TfliteBackend
from quantship.sensitivity.scoring import HeldOut
from quantship.sensitivity.weights import predict
from quantship.targets.run import (
    calibration_data,
    calibration_source,
    load_evaluation_data,
    load_for,
    split_run_data,
)


@dataclass
class SensitivitySetup:
    """Everything the analyses share for one model and dataset."""

    loaded: Any
    calib_batches: Callable[[], list[np.ndarray]]
    held: HeldOut
    onnx_path: Any
    node_layers: dict[str, str]
    work: Any
    threads: int | None = None
    _backends: dict[Any, Any] = field(default_factory=dict)

    def qdq(self, method: CalibrationMethod | str = CalibrationMethod.MAX) -> QdqBackend:
        """The Q/DQ backend (one per method; one statistics pass for all)."""
        import onnx

        method = CalibrationMethod.parse(method)
        key = ("qdq", method)
        if key not in self._backends:
            proto = onnx.load(str(self.onnx_path))
            if not hasattr(self, "_collector"):
                self._collector = collect_statistics(proto, self.calib_batches(), scope="qdq", threads=self.threads)
            amax = calibrate(self._collector, method).amax
            self._backends[key] = QdqBackend(proto, amax, self.node_layers, self.threads)
        return self._backends[key]

    def tflite(self, fast: bool = True) -> TfliteBackend:
        """The TFLite backend (it calibrates once, on first use)."""

        if not hasattr(self, "_converter"):
            self._converter = TfliteConverter(self.loaded.model, self.work / "convert.log", work_dir=self.work)
        key = ("tflite", fast)
        if key not in self._backends:
            self._backends[key] = TfliteBackend(self._converter, self.calib_batches, self.threads, fast=fast)
        return self._backends[key]

    def close(self) -> None:
        if hasattr(self, "_converter"):
            self._converter.close()


@dataclass
class SensitivitySpec:
    """The model and data of a sensitivity study (``quantship sensitivity``, ``convert --auto-fallback``).

    Attributes:
        images: Held-out images the analyses score on.
        calibration: Count and seed of the calibration images; ``data`` (a separate calibration dataset, then the
            held-out images are the first ``images`` of ``data``) and ``list`` (only the files it names) when
            given; otherwise they are drawn from ``data``, disjoint from the held-out images.
    """

    model: str
    data: str
    weights: str | None = None
    labels: str | None = None
    images: int = 200
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    preprocess_overrides: dict | None = None
    workers: int = 4
    anchors: str | None = None
    allow_missing_images: bool = False
    trust_savedmodel: bool = False


def prepare(spec: SensitivitySpec, work: Any, threads: int | None = None) -> SensitivitySetup:
    """Load the model, split the data (calibration / held-out: :class:`SensitivitySpec`), compute fp32 outputs,
    export ONNX."""

    import onnx

    work = Path(work)
    preprocess = resolve_preprocess(spec.model, spec.weights, spec.preprocess_overrides)
    dataset = load_evaluation_data(spec.data, spec.labels, spec.allow_missing_images)
    calibration, images, workers = spec.calibration, spec.images, spec.workers
    calib_images, seed = calibration.num_images, calibration.seed
    source = calibration_source(calibration, dataset)
    if source.pool is None:
        calib, held_set = split_calibration(
            dataset, calib_images, limit=min(images, len(dataset) - calib_images), seed=seed
        )
    else:
        calib, held_set = split_run_data(dataset, calibration, source, images, needed=True)
    loaded = load_for(spec.model, spec.weights, preprocess, dataset, trust_savedmodel=spec.trust_savedmodel)
    task = make_task(dataset, loaded, spec.anchors)
    xs, ys, keys = [], [], []
    for b in iter_batches(held_set, loaded.preprocess.with_overrides(crops="center"), 32, workers):
        xs.append(b.inputs[:, 0])
        ys += list(b.labels)
        keys += list(b.keys)
    if not xs:
        raise DataError(f"{dataset.source}: none of the {len(held_set)} held-out images could be read")
    x = np.concatenate(xs)
    reference = predict(loaded.model, x)
    manifest = {"source_model": {"name": loaded.name, "weights": loaded.weights}}
    onnx_art = convert_to_onnx(
        loaded.model,
        work / "artifacts" / f"{loaded.name}-onnx-fp32.onnx",
        manifest=manifest,
        log_path=work / "convert.log",
    )
    node_layers = onnx_node_layers(onnx.load(str(onnx_art.path)), loaded.model)
    return SensitivitySetup(
        loaded,
        calibration_data(calib, loaded, workers=workers, source=source).batches,
        HeldOut(x, ys, reference, task, keys),
        onnx_art.path,
        node_layers,
        work,
        threads,
    )
