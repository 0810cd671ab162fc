"""Sign-off: a models x targets matrix on one dataset, gated, resumable, run here or on a Ray cluster.

- :mod:`~quantship.signoff.plan`: the plan (:class:`SignoffPlan`) and its reader.
- :mod:`~quantship.signoff.units`: a unit's key, chunks, row and verdicts; the local executor.
- :mod:`~quantship.signoff.ray_executor`: the same units as Ray tasks.
- :mod:`~quantship.signoff.cluster`: a loopback-only local Ray instance, or a given cluster.
- :mod:`~quantship.signoff.run`: choosing the executor and driving a run (:func:`signoff`).
"""

from __future__ import annotations

from quantship.signoff.plan import ExecutorKind, PlanModel, SignoffPlan
from quantship.signoff.run import make_executor, signoff
from quantship.signoff.units import Executor, LocalExecutor, load_chunks, unit_key, unit_state, verdicts

__all__ = [
    "Executor",
    "ExecutorKind",
    "LocalExecutor",
    "PlanModel",
    "SignoffPlan",
    "load_chunks",
    "make_executor",
    "signoff",
    "unit_key",
    "unit_state",
    "verdicts",
]
