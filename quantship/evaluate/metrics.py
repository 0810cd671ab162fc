"""Metric accumulators: ``update(predictions, targets)``, ``result() -> dict``."""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

from quantship.errors import ConfigError


class Metric(Protocol):
    def update(self, predictions: np.ndarray, targets: Any) -> None: ...

    def result(self) -> dict[str, float]: ...


_METRICS: dict[str, Callable[..., Metric]] = {}


def register_metric(name: str):
    def deco(cls):
        _METRICS[name] = cls
        return cls

    return deco


def make_metric(name: str, **kwargs: Any) -> Metric:
    if name not in _METRICS:
        raise ConfigError(f"unknown metric '{name}'; known: {', '.join(sorted(_METRICS))}")
    return _METRICS[name](**kwargs)


@register_metric("topk")
class TopKAccuracy:
    """Top-1 and top-5 accuracy over class scores, plus the per-image correctness (for bootstrap CIs and
    agreement between targets)."""

    def __init__(self, ks: tuple[int, ...] = (1, 5)):
        self.ks = ks
        self.correct: dict[int, list[bool]] = {k: [] for k in ks}
        self.top1: list[int] = []

    def update(self, predictions: np.ndarray, targets: Any) -> None:
        scores = np.asarray(predictions)
        labels = np.asarray(targets).reshape(-1)
        if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
            raise ValueError(f"predictions {scores.shape} do not match {labels.shape[0]} labels")
        kmax = min(max(self.ks), scores.shape[1])
        # argsort on negated scores is stable: ties keep the lower class index first, for every runtime.
        order = np.argsort(-scores, axis=1, kind="stable")[:, :kmax]
        for k in self.ks:
            hit = (order[:, : min(k, kmax)] == labels[:, None]).any(axis=1)
            self.correct[k].extend(hit.tolist())
        self.top1.extend(order[:, 0].tolist())

    @property
    def count(self) -> int:
        return len(self.top1)

    def result(self) -> dict[str, float]:
        if not self.top1:
            return {f"top{k}": float("nan") for k in self.ks}
        return {f"top{k}": float(np.mean(self.correct[k])) for k in self.ks}
