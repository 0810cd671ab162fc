"""Runners: the Runner interface, the runtime registry (runners, artifact suffixes, availability, row fields, tool
distributions) and one runner per runtime (Keras, LiteRT, ONNX Runtime, TensorRT).

The public names, by module (imported on first use, so importing one module never loads its siblings):

- :mod:`~quantship.runtime.base`: Runner, RunnerOptions, TensorMeta
- :mod:`~quantship.runtime.registry`: RuntimeInfo, register_runtime, get_runtime, list_runtimes, make_runner,
  runtime_for_artifact, tool_distributions, tool_versions
"""

from __future__ import annotations

from quantship.lazy import public_attributes

_PUBLIC = {
    "Runner": "quantship.runtime.base",
    "RunnerOptions": "quantship.runtime.base",
    "RuntimeInfo": "quantship.runtime.registry",
    "TensorMeta": "quantship.runtime.base",
    "get_runtime": "quantship.runtime.registry",
    "list_runtimes": "quantship.runtime.registry",
    "make_runner": "quantship.runtime.registry",
    "register_runtime": "quantship.runtime.registry",
    "runtime_for_artifact": "quantship.runtime.registry",
    "tool_distributions": "quantship.runtime.registry",
    "tool_versions": "quantship.runtime.registry",
}
__all__ = sorted(_PUBLIC)
__getattr__ = public_attributes(__name__, _PUBLIC)
