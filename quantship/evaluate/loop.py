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
from quantship.data.datasets import ImageDataset, Skipped, iter_batches
from quantship.errors import QuantshipError
from quantship.evaluate.tasks import Arrays, Task, concat
from quantship.progress import track
from quantship.runtime.base import Runner


@dataclass
class TargetRun:
    """One target's per-image arrays and timing over the images it was run on."""

    name: str
    parts: list[Arrays] = field(default_factory=list)
    seconds: float = 0.0  # runtime time over the timed batches
    timed_images: int = 0
    error: str | None = None  # why the target stopped (its runner failed); the others go on

    @property
    def arrays(self) -> Arrays:
        return concat(self.parts)

    @property
    def latency_ms(self) -> float | None:
        return 1e3 * self.seconds / self.timed_images if self.timed_images else None


def run_targets(
    runners: Mapping[str, Runner],
    dataset: ImageDataset,
    preprocess: PreprocessSpec,
    task: Task,
    batch_size: int = 8,
    workers: int = 4,
    skipped: list[Skipped] | None = None,
    warmup_batches: int = 1,
    desc: str = "evaluate",
) -> dict[str, TargetRun]:
    """Run every (active) runner on every batch of ``dataset``.

    Args:
        runners: Target name -> active runner.
        warmup_batches: Leading batches left out of the latency figures (a dataset of one batch is timed
            anyway).

    Returns:
        Target name -> :class:`TargetRun`.
    """
    runs = {name: TargetRun(name) for name in runners}
    live = dict(runners)
    n_batches = (len(dataset) + batch_size - 1) // batch_size
    batches = iter_batches(dataset, preprocess, batch_size, workers, skipped)
    for i, batch in enumerate(track(batches, total=n_batches, desc=desc)):
        b, v = batch.inputs.shape[:2]
        flat = batch.inputs.reshape(b * v, *batch.inputs.shape[2:])
        timed = i >= warmup_batches or n_batches == 1
        for name, runner in list(live.items()):
            run = runs[name]
            try:
                out = first_output(runner.infer(flat))
            except QuantshipError as exc:  # one failing runtime does not take the others down
                run.error = str(exc)
                del live[name]
                continue
            if timed:
                run.seconds += runner.last_inference_time or 0.0
                run.timed_images += b
            run.parts.append(task.score(out, batch))
    return runs


def first_output(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The first output of a runner's result (every model here has one)."""
    return next(iter(outputs.values()))


def runner_outputs(runner: Runner, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """The first output of an active runner over ``x``, in batches (bounded memory on long inputs)."""
    return np.concatenate([first_output(runner.infer(x[i : i + batch])) for i in range(0, len(x), batch)])


def as_batch(keys: Any, labels: Any, inputs: np.ndarray | None = None) -> Any:
    """A minimal batch record (keys, labels, inputs with one view) for scoring outputs computed elsewhere."""
    from quantship.data.datasets import Batch

    return Batch(list(keys), inputs[:, None] if inputs is not None else np.zeros((len(keys), 1)), list(labels))
