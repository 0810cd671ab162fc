"""The evaluation loop: every active runner on the same decoded, preprocessed batches.

Each image is decoded once for all targets; the task turns each target's raw outputs into per-image arrays.
Only the runtime call is timed (``Runner.last_inference_time``), and the first batch can be left out of the
latency figures (it traces, allocates and warms caches).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from quantship.config import PreprocessSpec
from quantship.data.datasets import Batch, ImageDataset, Skipped, iter_batches
from quantship.data.preprocess import InputEncoding
from quantship.errors import QuantshipError
from quantship.evaluate.tasks import Arrays, Task, concat
from quantship.progress import track
from quantship.runtime.base import Runner, TensorMeta, dequantize


@dataclass
class TargetRun:
    """One target's per-image arrays and timing over the images it was run on."""

    name: str
    parts: list[Arrays] = field(default_factory=list)
    seconds: float = 0.0  # runtime time over the timed batches
    timed_images: int = 0
    nonfinite_images: int = 0  # images whose outputs hold NaN or inf (scored as wrong, never as class 0)
    error: str | None = None  # why the target stopped (its runner failed); the others go on

    @property
    def arrays(self) -> Arrays:
        return concat(self.parts)

    @property
    def latency_ms(self) -> float | None:
        return 1e3 * self.seconds / self.timed_images if self.timed_images else None


@dataclass
class Batches:
    """The images a pass runs on and how they are read (what the evaluation loop and its callers hand down
    together).

    Attributes:
        dataset: The images, in order.
        batch_size: Images per runtime call.
        workers: Decoding threads.
        skipped: Filled with the images no decoder could read (left out, listed by the job).
    """

    dataset: ImageDataset
    batch_size: int = 8
    workers: int = 4
    skipped: list[Skipped] | None = None


def run_targets(
    runners: Mapping[str, Runner],
    batches: Batches,
    preprocess: PreprocessSpec,
    task: Task,
    warmup_batches: int = 1,
    desc: str = "evaluate",
) -> dict[str, TargetRun]:
    """Run every (active) runner on every batch of ``batches``.

    Args:
        runners: Target name -> active runner.
        warmup_batches: Leading batches left out of the latency figures (a dataset of one batch is timed
            anyway).

    Returns:
        Target name -> :class:`TargetRun`.
    """
    runs = {name: TargetRun(name) for name in runners}
    feeds = {name: InputFeed.of(runner, preprocess) for name, runner in runners.items()}
    live = dict(runners)
    n_batches = (len(batches.dataset) + batches.batch_size - 1) // batches.batch_size
    read = iter_batches(batches.dataset, preprocess, batches.batch_size, batches.workers, batches.skipped)
    for i, batch in enumerate(track(read, total=n_batches, desc=desc)):
        b = len(batch.keys)
        timed = i >= warmup_batches or n_batches == 1
        for name, runner in list(live.items()):
            run = runs[name]
            try:
                out = feeds[name].run(runner, batch)
            except QuantshipError as exc:  # one failing runtime does not take the others down
                run.error = str(exc)
                del live[name]
                continue
            run.nonfinite_images += int(nonfinite_images(out, b).sum())
            if timed:
                run.seconds += runner.last_inference_time or 0.0
                run.timed_images += b
            run.parts.append(task.score(out, batch))
    return runs


@dataclass(frozen=True)
class InputFeed:
    """How one runner is fed from a batch's uint8 pixels.

    A model whose input is quantized (TFLite int8/uint8 I/O) gets its integer tensor straight from the pixels
    (normalisation and quantization folded into one table lookup, no float pass) and its output is
    dequantized here; every other model gets the float32 input, computed once per batch for all of them.
    """

    encoding: InputEncoding
    raw: bool = False
    outputs: tuple[TensorMeta, ...] = ()

    @classmethod
    def of(cls, runner: Runner, spec: PreprocessSpec) -> "InputFeed":
        metas = runner.input_metadata()
        if len(metas) == 1 and metas[0].quantized:
            m = metas[0]
            return cls(InputEncoding.of(spec, m.dtype, m.scale, m.zero_point), True, tuple(runner.output_metadata()))
        return cls(InputEncoding.of(spec))

    def run(self, runner: Runner, batch: Batch) -> np.ndarray:
        """The first output (float) of ``runner`` on every view of ``batch``, flattened (images x views)."""
        x = batch.encoded(self.encoding)
        outputs = runner.infer(x.reshape(-1, *x.shape[2:]), raw=self.raw)
        name, y = next(iter(outputs.items()))
        meta = next((m for m in self.outputs if m.name == name), None)
        return dequantize(y, meta) if meta is not None and meta.quantized else y


def nonfinite_images(outputs: np.ndarray, images: int) -> np.ndarray:
    """Per image (of ``images``, each with its views), whether any of its outputs is NaN or inf."""
    out = np.asarray(outputs)
    if out.dtype.kind not in "fc" or not images:
        return np.zeros(images, bool)
    return ~np.isfinite(out.reshape(images, -1)).all(axis=1)


def first_output(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The first output of a runner's result (every model here has one)."""
    return next(iter(outputs.values()))


def runner_outputs(runner: Runner, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """The first output of an active runner over ``x``, in batches (bounded memory on long inputs)."""
    return np.concatenate([first_output(runner.infer(x[i : i + batch])) for i in range(0, len(x), batch)])


def as_batch(keys: Any, labels: Any, inputs: np.ndarray | None = None) -> Any:
    """A minimal batch record (keys, labels, inputs with one view) for scoring outputs computed elsewhere."""
    return Batch(list(keys), inputs[:, None] if inputs is not None else np.zeros((len(keys), 1)), list(labels))
