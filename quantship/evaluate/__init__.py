"""Evaluation: tasks (classification, detection) and their metrics, the evaluation loop, intervals and verdicts,
latency, environment, reports. Imports no converter and no job.

The public names, by module (imported on first use, so importing one module never loads its siblings):

- :mod:`~quantship.evaluate.tasks`: Task, make_task
- :mod:`~quantship.evaluate.loop`: run_targets
- :mod:`~quantship.evaluate.verdicts`: gate_verdict
- :mod:`~quantship.evaluate.report`: build_report, load_results
- :mod:`~quantship.evaluate.latency`: measure_latency
- :mod:`~quantship.evaluate.environment`: environment
- :mod:`~quantship.evaluate.results`: text_table, write_results
"""

from __future__ import annotations

from quantship.lazy import public_attributes

_PUBLIC = {
    "Task": "quantship.evaluate.tasks",
    "build_report": "quantship.evaluate.report",
    "environment": "quantship.evaluate.environment",
    "gate_verdict": "quantship.evaluate.verdicts",
    "load_results": "quantship.evaluate.report",
    "make_task": "quantship.evaluate.tasks",
    "measure_latency": "quantship.evaluate.latency",
    "run_targets": "quantship.evaluate.loop",
    "text_table": "quantship.evaluate.results",
    "write_results": "quantship.evaluate.results",
}
__all__ = sorted(_PUBLIC)
__getattr__ = public_attributes(__name__, _PUBLIC)
