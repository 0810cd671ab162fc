"""``quantship bench``: build artifacts if asked, time each one in its own process, write the rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from quantship.errors import ConfigError
from quantship.evaluate.bench import BenchConfig, bench, display_fields, mobile_profile
from quantship.evaluate.environment import environment
from quantship.evaluate.report import BENCH_COLUMNS
from quantship.evaluate.results import text_table
from quantship.fileio import write_json_atomic, write_text_atomic
from quantship.jobs import JobResult


def run_bench(
    out: Path,
    artifacts: Sequence[str] = (),
    model: str | None = None,
    convert: dict[str, Any] | None = None,
    threads: int | None = None,
    mobile: bool = False,
    batch_sizes: Sequence[int] = (1,),
    warmup_seconds: float = 1.0,
    min_queries: int = 200,
    min_seconds: float = 5.0,
    cuda_graph: bool = False,
    providers: Sequence[str] = ("cpu",),
) -> JobResult:
    """Benchmark artifact files, and the artifacts of ``model``'s targets built first with ``convert``
    (the keyword arguments of :func:`quantship.jobs.convert.convert_artifacts`)."""
    named: list[tuple[str, str]] = [(Path(a).stem, str(a)) for a in artifacts]
    failures: dict[str, str] = {}
    if model:
        from quantship.jobs.convert import convert_artifacts

        built, failures = convert_artifacts(model, out_dir=Path(out), threads=threads, **(convert or {}))
        named += [(name, str(a.path)) for name, a in built.items() if a is not None]
    if not named:
        raise ConfigError("nothing to benchmark: give --artifact FILE (repeatable) or --model with --targets")
    common = dict(
        warmup_seconds=warmup_seconds,
        min_queries=min_queries,
        min_seconds=min_seconds,
        batch_sizes=tuple(batch_sizes),
        cuda_graph=cuda_graph,
        providers=tuple(providers),
    )
    from quantship.targets import get_target, list_targets

    known = {t.name for t in list_targets()}
    configs = []
    for name, path in named:
        if mobile and path.endswith(".tflite"):
            configs += mobile_profile(path, name, **common)
        else:
            # A target is timed with the session options it is evaluated with (Q/DQ targets: as fake-quant).
            session = get_target(name).session_config if name in known else ()
            configs.append(BenchConfig(path, target=name, threads=threads, session_config=session, **common))
    lines = [
        f"benchmarking {len(configs)} configuration(s): warm-up {warmup_seconds:g} s, then >= {min_queries} "
        f"queries and >= {min_seconds:g} s each"
    ]
    rows = bench(configs)
    for r in rows:
        r["model"] = model or ""
    out = Path(out)
    write_text_atomic(out / "bench.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    write_json_atomic(out / "environment.json", environment())
    lines.append(text_table([display_fields(dict(r)) for r in rows], BENCH_COLUMNS))
    for r in rows:
        for w in r.get("warnings", []):
            lines.append(f"warning: {r['target']}: {w}")
        if r.get("compute_ms_mean") is not None:
            lines.append(
                f"{r['target']}: H2D {r['h2d_ms_mean']:.3f} ms, compute {r['compute_ms_mean']:.3f} ms, D2H "
                f"{r['d2h_ms_mean']:.3f} ms"
            )
    lines += [f"FAILED {name}: {error}" for name, error in failures.items()]
    lines.append(f"results: {out / 'bench.jsonl'}")
    return JobResult(rows, lines, 1 if failures else 0)
