"""One streaming statistics pass over an ONNX model with ONNX Runtime (CPU).

The model is copied with the tensors of interest added as graph outputs; each calibration batch is run once
and every tensor's values go straight into its :class:`TensorStats` (histogram + min/max), then are
dropped. Memory depends on one batch's activations and the histograms, not on the number of batches.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from quantship.calibrate.feed import checked_batches
from quantship.calibrate.histogram import DEFAULT_BINS, TensorStats
from quantship.errors import CalibrationError, RuntimeBackendError
from quantship.lazy import lazy_import
from quantship.runtime.onnxruntime import make_session

FLOAT = 1  # onnx.TensorProto.FLOAT


def float_activation_tensors(model: Any) -> list[str]:
    """Names of the float32 activations (graph inputs and node outputs, not initializers), in graph order."""
    onnx = lazy_import("onnx")
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    for node in model.graph.node:
        if node.op_type in ("Constant", "Shape"):
            continue
        names += [o for o in node.output if o and types.get(o) == FLOAT]
    seen: set[str] = set()
    return [n for n in names if not (n in seen or seen.add(n))]


class StatisticsCollector:
    """Collect per-tensor statistics of an ONNX model over a calibration feed.

    Args:
        model: ``onnx.ModelProto`` or path.
        tensors: Tensors to observe (default: every float activation).
        num_bins: Initial histogram bins.
        threads: ONNX Runtime intra-op threads and histogram threads (default: all cores).
        keep_images: Input images kept from the feed (``sample``, a seeded uniform draw): what the auto method
            measures output errors on.
    """

    def __init__(
        self,
        model: Any,
        tensors: Sequence[str] | None = None,
        num_bins: int = DEFAULT_BINS,
        threads: int | None = None,
        keep_images: int = 8,
    ):
        onnx = lazy_import("onnx")
        self.model = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
        self.tensors = list(tensors) if tensors is not None else float_activation_tensors(self.model)
        self.num_bins = num_bins
        self.threads = threads or os.cpu_count() or 1
        self.stats: dict[str, TensorStats] = {t: TensorStats(t, num_bins) for t in self.tensors}
        self.batches = 0
        self.images = 0
        self.keep_images = keep_images
        self.sample: list[dict[str, np.ndarray]] = []
        self._rng = np.random.default_rng(0)

    def _session(self):
        onnx = lazy_import("onnx")
        aug = onnx.ModelProto()
        aug.CopyFrom(self.model)
        existing = {o.name for o in aug.graph.output}
        for name in self.tensors:
            if name not in existing:
                aug.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        try:
            # Fusions would remove the intermediate tensors we observe: keep the graph as it is.
            return make_session(aug, self.threads, optimization="disable", what="calibration model")
        except RuntimeBackendError as exc:
            raise CalibrationError(f"ONNX Runtime cannot run the model for calibration: {exc}") from None

    def collect(self, feed: Iterable[dict[str, np.ndarray] | np.ndarray]) -> dict[str, TensorStats]:
        """Run the feed through the model once, updating the statistics of every observed tensor."""
        session = self._session()
        inputs = [(i.name, tuple(d if isinstance(d, int) else None for d in i.shape)) for i in session.get_inputs()]
        # Graph order: when a NaN appears, the first tensor reported is where it arose, not a later one.
        produced = {o.name for o in session.get_outputs()}
        out_names = [t for t in self.tensors if t in produced]
        with cf.ThreadPoolExecutor(max_workers=self.threads) as pool:
            for batch in checked_batches(feed, inputs):
                values = session.run(out_names, batch)
                # numpy releases the GIL in abs/max/bincount: histogram the tensors in parallel.
                list(pool.map(lambda nv: self.stats[nv[0]].update(nv[1]), zip(out_names, values)))
                del values
                n = next(iter(batch.values())).shape[0]
                self._keep(batch, n)
                self.batches += 1
                self.images += n
        return self.stats

    def _keep(self, batch: dict[str, np.ndarray], n: int) -> None:
        """Reservoir sampling (seeded): ``sample`` stays a uniform draw of ``keep_images`` single-image batches
        from the whole feed, however it is ordered."""
        for i in range(n):
            seen = self.images + i
            one = {k: v[i : i + 1].copy() for k, v in batch.items()}
            if len(self.sample) < self.keep_images:
                self.sample.append(one)
            else:
                j = int(self._rng.integers(0, seen + 1))
                if j < self.keep_images:
                    self.sample[j] = one

    def memory_bytes(self) -> int:
        return sum(s.nbytes() for s in self.stats.values())
