"""``bench --remote``: every configuration timed by its own runner process on the device, through the interleaved
bench's :class:`~quantship.evaluate.interleave.BenchWorker` protocol, so device configurations take rounds in turn
exactly as local ones do (and can be interleaved with local ones in one run: ``benchmarks/remote_overhead.py``).

The device runner makes the same seeded sample set the host would (nothing but the artifact is sent), times the
same ``infer`` call as quantship's local :class:`~quantship.evaluate.bench.ConfigSession`, and answers per-query
times; the host builds the row with the same statistics as a local bench.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from quantship.errors import ConfigError, RemoteConnectionLost
from quantship.evaluate.bench import BenchConfig, bench, latency_batch, settle_fields
from quantship.evaluate.latency import latency_stats
from quantship.remote.host import DeviceProcess, DeviceSession, RemoteRunner
from quantship.runtime.base import RunnerOptions
from quantship.runtime.registry import runtime_for_artifact


def check_remote_config(cfg: BenchConfig) -> None:
    """Refuse what a device runner does not do: LoadGen (it runs on the host).

    Raises:
        ConfigError: Naming the option.
    """
    if cfg.loadgen:
        raise ConfigError("--loadgen runs MLPerf LoadGen on this machine; with --remote, time without --loadgen")


class RemoteBenchWorker:
    """A :class:`~quantship.evaluate.interleave.BenchWorker` whose configuration runs in its own runner process on
    the device.

    It keeps what it has measured (``info``, ``rounds``), so that rows survive a connection that drops
    mid-run (:func:`partial_rows`).

    Args:
        session: The open device session.
        cfg: The configuration (its artifact is copied to the device unless cached there).
    """

    def __init__(self, session: DeviceSession, cfg: BenchConfig):
        check_remote_config(cfg)
        self.session = session
        self.cfg = cfg
        self.target = cfg.target or Path(cfg.artifact).stem
        self.artifact = str(cfg.artifact)
        self.runtime = runtime_for_artifact(cfg.artifact)
        self.process: DeviceProcess | None = None
        self.info: dict[str, Any] | None = None
        self.rounds: list[list[float]] = []

    def start(self) -> dict[str, Any]:
        """Copy the artifact (unless cached), start the device runner, load, time the first inference, warm up."""
        cfg = self.cfg
        options = RunnerOptions(
            threads=cfg.threads, providers=cfg.providers, session_config=cfg.session_config, cuda_graph=cfg.cuda_graph
        )
        runner = RemoteRunner(self.session, cfg.artifact, self.runtime.name, options, self.target)
        remote, copied = self.session.put(cfg.artifact)
        self.process = self.session.process()
        loaded = runner.load(self.process, remote, cfg.cores)
        batch = latency_batch(cfg)
        started = self.process.request(
            "bench_start",
            batch=batch,
            samples=cfg.samples,
            raw=cfg.raw_inputs,
            warmup_seconds=cfg.warmup_seconds,
            cores=list(cfg.cores) if cfg.cores else None,
        )[0]
        self.info = {
            "target": self.target,
            "artifact": self.artifact,
            "runtime": self.runtime.name,
            "timing": self.runtime.timing,
            "harness": "bench",
            "inputs": "raw" if cfg.raw_inputs else "float",
            "threads": cfg.threads,
            "providers": loaded.get("providers"),  # the runtime's own list (ONNX Runtime's), else None
            "session_config": dict(cfg.session_config),
            "cores": list(cfg.cores) if cfg.cores else None,
            "cores_in_use": started["cores_in_use"],
            "file_size_bytes": loaded["file_size_bytes"],
            "init_ms": loaded["init_ms"],
            "first_inference_ms": started["first_inference_ms"],
            "warmup_queries": started["warmup_queries"],
            "latency_batch": batch,
            "input_conversion_ms": started["input_conversion_ms"],
            "load_average_before": started["load_average_before"],
            "cpu_mhz_before": started["cpu_mhz_before"],
            "where": "remote",
            "remote": {**self.session.fields(), "artifact_copied": copied},
        }
        return dict(self.info)

    def round(self, queries: int) -> list[float]:
        """``queries`` back-to-back queries on the device at the latency batch (ms each, the device's clock)."""
        times = [float(v) for v in self.process.request("round", queries=int(queries))[0]["query_ms"]]
        self.rounds.append(times)
        return times

    def finish(self) -> dict[str, Any]:
        """The device's own figures after the rounds; stops the device runner."""
        cfg = self.cfg
        other = [b for b in cfg.batch_sizes if b != latency_batch(cfg)]
        answer = self.process.request(
            "bench_finish",
            other_batches=other,
            samples=cfg.samples,
            raw=cfg.raw_inputs,
            warmup_seconds=cfg.warmup_seconds,
            min_iters=cfg.min_queries or 200,
            min_seconds=cfg.min_seconds if cfg.min_seconds is not None else 5.0,
            cores=list(cfg.cores) if cfg.cores else None,
        )[0]
        row: dict[str, Any] = {
            "load_average_after": answer["load_average_after"],
            "cpu_mhz_after": answer["cpu_mhz_after"],
            "peak_rss_mb": answer["peak_rss_mb"],
            "config": asdict(cfg),
        }
        if answer["runtime_ms"]:
            row.update(latency_stats(np.asarray(answer["runtime_ms"]), "runtime_ms"))
        row.update(settle_fields(answer["settle_ms"], answer["settled"]))
        row.update({f"{k}_mean": v for k, v in answer["phases"].items()})
        row.update({f"throughput_ips_b{b}": v for b, v in answer["throughput"].items()})
        row.update(answer.get("details") or {})
        self.close()
        return row

    def close(self) -> None:
        if self.process is not None:
            self.process.close()
            self.process = None


def partial_rows(workers: Sequence[RemoteBenchWorker]) -> list[dict[str, Any]]:
    """The rows of an interrupted remote run: each configuration that was started, with the statistics of the
    rounds it completed, marked ``incomplete_run``."""
    rows = []
    for w in workers:
        if w.info is None:
            continue
        row = {**w.info, "incomplete_run": True, "rounds": len(w.rounds), "config": asdict(w.cfg)}
        if w.rounds:
            row.update(latency_stats(np.concatenate([np.asarray(r) for r in w.rounds])))
        rows.append(row)
    return rows


def remote_bench(
    session: DeviceSession, configs: Sequence[BenchConfig], interleave: Any = None, lines: list[str] | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Every configuration on the device, interleaved round by round as a local bench runs them.

    Returns:
        The rows, and None; or, when the connection dropped, the rows measured before (marked
        ``incomplete_run: true``) and the error message.
    """

    for cfg in configs:
        check_remote_config(cfg)
    made: list[RemoteBenchWorker] = []

    def make(cfg: BenchConfig) -> RemoteBenchWorker:
        made.append(RemoteBenchWorker(session, cfg))
        return made[-1]

    try:
        return bench(configs, interleave=interleave, lines=lines, make_worker=make), None
    except RemoteConnectionLost as exc:
        return partial_rows(made), str(exc)
