"""``quantship models`` and ``quantship targets``: what the registries hold."""

from __future__ import annotations

from quantship.jobs import JobResult
from quantship.targets import DEFAULT_TARGETS, list_targets

__all__ = ["DEFAULT_TARGETS", "list_models", "list_target_lines"]


def list_models(with_stats: bool = True) -> JobResult:
    from quantship.models.stats import model_table

    return JobResult([], [model_table(with_stats=with_stats)])


def list_target_lines() -> JobResult:
    return JobResult([], [f"{t.name:24s} {t.spec.description}" for t in list_targets()])
