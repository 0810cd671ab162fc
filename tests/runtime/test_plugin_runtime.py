"""Adding a runtime is one module and one registration: a runtime defined here, in the test, is evaluated as a
target through the public API without touching the package."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from conftest import TINY_PREPROCESS
from quantship.config import Precision, TargetSpec, parse_preprocess_overrides
from quantship.runtime.base import Runner, RunnerOptions, TensorMeta
from quantship.runtime.registry import RuntimeInfo, register_runtime, unregister_runtime
from quantship.targets import register_target, unregister_target


class KerasCallRunner(Runner):
    """Runs an in-memory Keras model eagerly, ``model(x)``: a runtime the package does not have."""

    def __init__(self, model: Any, name: str):
        super().__init__(name)
        self.model = model
        self.calls = 0

    def activate_impl(self) -> None:
        self.calls = 0

    def infer_impl(self, feed: dict[str, np.ndarray], raw: bool) -> dict[str, np.ndarray]:
        self.calls += 1
        out = self._time_runtime(lambda: np.asarray(self.model(feed["input"], training=False)))
        return {"probs": out}

    def input_metadata_impl(self) -> list[TensorMeta]:
        return [TensorMeta("input", (None, *self.model.inputs[0].shape[1:]), np.dtype(np.float32))]

    def output_metadata_impl(self) -> list[TensorMeta]:
        return [TensorMeta("probs", (None, *self.model.outputs[0].shape[1:]), np.dtype(np.float32))]


@pytest.fixture
def keras_call_target():
    made: list[KerasCallRunner] = []

    def make(source: Any, options: RunnerOptions, name: str | None) -> KerasCallRunner:
        made.append(KerasCallRunner(source, name or "keras-call"))
        return made[-1]

    register_runtime(RuntimeInfo("keras-call", make, description="model(x), eagerly"))
    register_target(
        TargetSpec("keras-call-fp32", "keras-call", Precision.FP32, description="test runtime"), lambda ctx, spec: None
    )
    yield made
    unregister_target("keras-call-fp32")
    unregister_runtime("keras-call")


@pytest.mark.slow
def test_a_runtime_registered_outside_the_package_is_evaluated(
    keras_call_target, trained_tiny, synset_dataset, tmp_path
):
    from quantship.jobs.eval import EvalSpec, run_eval

    _, model_path = trained_tiny
    spec = EvalSpec(
        model=str(model_path),
        data=f"imagenet:{synset_dataset}",
        targets=["keras-fp32", "keras-call-fp32"],
        out_dir=tmp_path / "out",
        preprocess_overrides=parse_preprocess_overrides(TINY_PREPROCESS),
        limit=20,
    )
    rows = run_eval(spec).rows
    ref, ours = rows
    assert ours["target"] == "keras-call-fp32" and ours["runtime"] == "keras-call"
    assert ours["images"] == 20 and ours["top1"] == ref["top1"] and ours["agreement_top1"] == 1.0
    assert ours["latency_ms"] > 0
    assert keras_call_target and keras_call_target[0].calls == 3  # 20 images in batches of 8
    assert "keras-call-fp32" in (tmp_path / "out" / "results.md").read_text()
