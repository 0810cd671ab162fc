"""``bench --remote``: each configuration timed by its own runner process on the device, with the statistics of a
local bench (:func:`quantship.evaluate.latency.latency_stats` over the device's per-query times).

The device runner makes the same seeded sample set as the host would (nothing but the artifact is sent), warms
up and times the same ``infer`` call as :func:`quantship.evaluate.latency.time_runner`; the host turns the
per-query times into the row.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from quantship.errors import ConfigError, RemoteConnectionLost
from quantship.evaluate.bench import DEFAULT_MIN_QUERIES, DEFAULT_MIN_SECONDS, BenchConfig, annotate
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
    """One configuration's runner on the device, kept alive so that its timing can be asked for in rounds (the
    interleaved bench) or all at once.

    Args:
        session: The open device session.
        cfg: The configuration (its artifact is copied to the device unless cached there).
    """

    def __init__(self, session: DeviceSession, cfg: BenchConfig):
        check_remote_config(cfg)
        self.session = session
        self.cfg = cfg
        self.runtime = runtime_for_artifact(cfg.artifact)
        self.process: DeviceProcess | None = None
        self.row: dict[str, Any] = {}

    def start(self) -> dict[str, Any]:
        """Copy the artifact if needed, start the device runner and load the model; returns the row's fixed
        fields (everything but the timings)."""
        cfg = self.cfg
        options = RunnerOptions(
            threads=cfg.threads, providers=cfg.providers, session_config=cfg.session_config, cuda_graph=cfg.cuda_graph
        )
        runner = RemoteRunner(self.session, cfg.artifact, self.runtime.name, options, cfg.target or "")
        remote, copied = self.session.put(cfg.artifact)
        self.process = self.session.process()
        loaded = runner.load(self.process, remote, cfg.cores)
        self.row = {
            "target": cfg.target or Path(cfg.artifact).stem,
            "artifact": str(cfg.artifact),
            "runtime": self.runtime.name,
            "timing": self.runtime.timing,
            "harness": "bench",
            "inputs": "raw" if cfg.raw_inputs else "float",
            "threads": cfg.threads,
            "providers": loaded.get("providers") if self.runtime.name == "onnx" else None,
            "session_config": dict(cfg.session_config),
            "cores": list(cfg.cores) if cfg.cores else None,
            "file_size_bytes": loaded["file_size_bytes"],
            "init_ms": loaded["init_ms"],
            "where": "remote",
            "remote": {**self.session.fields(), "artifact_copied": copied},
        }
        self.row["input_conversion_ms"] = self.process.request("conversion")[0]["input_conversion_ms"]
        return self.row

    def time(
        self, batch: int, min_iters: int, min_seconds: float, warmup_seconds: float, warmup_calls: int = 1
    ) -> dict[str, Any]:
        """One timing pass on the device: per-query times (ms) of the whole call, of the runtime's call, phases."""
        cfg = self.cfg
        answer, _ = self.process.request(
            "time",
            batch=batch,
            samples=cfg.samples,
            raw=cfg.raw_inputs,
            warmup_calls=warmup_calls,
            warmup_seconds=warmup_seconds,
            min_iters=min_iters,
            min_seconds=min_seconds,
        )
        return answer

    def finish(self) -> dict[str, Any]:
        """The device process's peak memory and the configuration; stops the runner."""
        self.row["peak_rss_mb"] = self.process.request("rusage")[0]["peak_rss_mb"]
        self.row["config"] = asdict(self.cfg)
        self.close()
        return self.row

    def close(self) -> None:
        if self.process is not None:
            self.process.close()
            self.process = None


def remote_config_row(session: DeviceSession, cfg: BenchConfig) -> dict[str, Any]:
    """:func:`quantship.evaluate.bench.run_config` on the device: the same row, ``where: remote``."""
    worker = RemoteBenchWorker(session, cfg)
    try:
        row = worker.start()
        min_queries = cfg.min_queries if cfg.min_queries is not None else DEFAULT_MIN_QUERIES
        min_seconds = cfg.min_seconds if cfg.min_seconds is not None else DEFAULT_MIN_SECONDS
        for b in cfg.batch_sizes:
            t = worker.time(b, min_queries, min_seconds, cfg.warmup_seconds)
            query = np.asarray(t["query_ms"])
            if b == 1 or "latency_ms_p50" not in row:
                row.update(latency_stats(query))
                row.update(latency_stats(np.asarray(t["runtime_ms"]), "runtime_ms"))
                row["latency_batch"] = b
                for k, v in (t.get("phases") or {}).items():
                    row[f"{k}_mean"] = float(np.mean(v))
            row[f"throughput_ips_b{b}"] = b * len(query) / (query.sum() / 1e3)
        return worker.finish()
    finally:
        worker.close()


def remote_bench(session: DeviceSession, configs: Sequence[BenchConfig]) -> tuple[list[dict[str, Any]], str | None]:
    """Every configuration on the device, one runner process each, in turn.

    Returns:
        The rows, and None; or, when the connection dropped, the rows measured before (each marked
        ``incomplete_run: true``) and the error message.
    """
    for cfg in configs:
        check_remote_config(cfg)
    rows: list[dict[str, Any]] = []
    try:
        for cfg in configs:
            rows.append(remote_config_row(session, cfg))
    except RemoteConnectionLost as exc:
        for r in rows:
            r["incomplete_run"] = True
        return annotate(rows), str(exc)
    return annotate(rows), None
