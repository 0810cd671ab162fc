"""Parameter and multiply-accumulate counts of registered models (cached: building them takes seconds)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from quantship.fileio import cache_dir, write_json_atomic
from quantship.models.registry import get_model_spec


def count_macs(model: Any) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (convolutions and dense layers)."""
    keras = __import__("keras")
    total = 0
    for layer in model.layers:
        try:
            out_shape = layer.output.shape
            in_shape = layer.input.shape
        except (AttributeError, ValueError):
            continue
        if isinstance(layer, keras.layers.SeparableConv2D):
            kh, kw = layer.kernel_size
            cin = int(in_shape[-1])
            spatial = int(np.prod(out_shape[1:-1]))
            total += spatial * kh * kw * cin * layer.depth_multiplier + spatial * cin * layer.depth_multiplier * int(
                out_shape[-1]
            )
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw = layer.kernel_size
            total += int(np.prod(out_shape[1:])) * kh * kw
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            cin = in_shape[-1] // getattr(layer, "groups", 1)
            total += int(np.prod(out_shape[1:])) * kh * kw * cin
        elif isinstance(layer, keras.layers.Dense):
            total += int(in_shape[-1]) * int(out_shape[-1]) * int(np.prod(out_shape[1:-1]) or 1)
        elif hasattr(layer, "layers"):  # nested model
            total += count_macs(layer)
    return int(total)


def model_stats(name: str) -> dict[str, Any]:
    """``{"params": ..., "macs": ...}`` for a registered model, from the cache when available."""
    import keras

    path = cache_dir() / f"model_stats-v2-keras{keras.__version__}.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if name not in cache:
        spec = get_model_spec(name)
        model = spec.build()
        cache[name] = {"params": int(model.count_params()), "macs": count_macs(model)}
        del model
        keras.backend.clear_session()
        write_json_atomic(path, cache)
    return cache[name]
