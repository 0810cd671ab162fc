"""What every analysis of one model shares: the model, its calibration and held-out images, the fp32 outputs,
the ONNX export, and the backends built from them once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from quantship.config import CalibrationMethod
from quantship.sensitivity.backends import QdqBackend, TfliteBackend
from quantship.sensitivity.scoring import HeldOut
from quantship.sensitivity.weights import predict


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

        from quantship.calibrate.api import calibrate
        from quantship.convert.calibrated import collect_statistics

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
        from quantship.convert.tflite import TfliteConverter

        if not hasattr(self, "_converter"):
            self._converter = TfliteConverter(self.loaded.model, self.work / "convert.log", work_dir=self.work)
        key = ("tflite", fast)
        if key not in self._backends:
            self._backends[key] = TfliteBackend(self._converter, self.calib_batches, self.threads, fast=fast)
        return self._backends[key]

    def close(self) -> None:
        if hasattr(self, "_converter"):
            self._converter.close()


def prepare(
    model: str,
    weights: str | None,
    data: str,
    labels: str | None,
    images: int,
    calib_images: int,
    work: Any,
    preprocess_overrides: dict | None = None,
    seed: int = 0,
    threads: int | None = None,
    workers: int = 4,
    anchors: str | None = None,
    allow_missing_images: bool = False,
    trust_savedmodel: bool = False,
    calib_data: str | None = None,
    calib_list: str | None = None,
) -> SensitivitySetup:
    """Load the model, split the data (calibration / held-out), compute fp32 outputs, export ONNX.

    Calibration images come from ``calib_data`` when given (then the held-out images are the first ``images``
    of ``data``), restricted to the files ``calib_list`` names when given; otherwise they are drawn from
    ``data``, disjoint from the held-out images."""

    import onnx

    from quantship.config import CalibrationSpec
    from quantship.convert.onnx import convert_to_onnx, onnx_node_layers
    from quantship.data.datasets import iter_batches, split_calibration
    from quantship.evaluate.tasks import make_task
    from quantship.models.loading import resolve_preprocess
    from quantship.targets.run import (
        calibration_data,
        calibration_source,
        load_evaluation_data,
        load_for,
        split_run_data,
    )

    work = Path(work)
    preprocess = resolve_preprocess(model, weights, preprocess_overrides)
    dataset = load_evaluation_data(data, labels, allow_missing_images)
    calibration = CalibrationSpec(num_images=calib_images, seed=seed, data=calib_data, list=calib_list)
    source = calibration_source(calibration, dataset)
    if source.pool is None:
        calib, held_set = split_calibration(
            dataset, calib_images, limit=min(images, len(dataset) - calib_images), seed=seed
        )
    else:
        calib, held_set = split_run_data(dataset, calibration, source, images, needed=True)
    loaded = load_for(model, weights, preprocess, dataset, trust_savedmodel=trust_savedmodel)
    task = make_task(dataset, loaded, anchors)
    xs, ys, keys = [], [], []
    for b in iter_batches(held_set, loaded.preprocess.with_overrides(crops="center"), 32, workers):
        xs.append(b.inputs[:, 0])
        ys += list(b.labels)
        keys += list(b.keys)
    if not xs:
        from quantship.errors import DataError

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
