"""Sign-off on a Ray cluster: the units of work are the chunks sign-off stores.

One task per model builds all of that model's artifacts (one export and one statistics pass shared by every
target, exactly as the local executor does); every chunk task of that model takes the build's result as an
argument, so Ray runs it only after the build, on any node, and it builds its runner from the artifact through
the target registry. Chunk tasks evaluate and store their chunk through the same function as the local
executor, into the output folder, which every node must see at the same path; the driver (which holds the
folder's lock) makes the rows from the stored chunks with the same function too, so rows and verdicts are the
local executor's. Workers read the dataset by path themselves (refusing one whose listing differs from the
driver's); only its spec and the evaluation images' keys travel through Ray.

Besides each chunk, a task records where it ran (``chunk-*.json``: node, worker, CPU model and flags, attempt),
since int8 results of some runtimes depend on the CPU; rows of a Ray run add ``executor``, ``nodes``,
``workers``, ``cpu_models`` and ``retries``. A task whose worker dies is run again up to ``max_retries`` times
(counted with marker files, since Ray does not tell), an exception in a task is not retried: it stops the run
with one line naming the unit, and the next run resumes from the stored chunks.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from quantship.config import InputCacheOptions
from quantship.data import cache
from quantship.data.cache import current_options
from quantship.errors import ExecutorError
from quantship.evaluate.environment import cpu_flags, cpu_model
from quantship.evaluate.tasks import make_task
from quantship.fileio import write_json_atomic, write_text_atomic
from quantship.manifest import Artifact
from quantship.models.loading import is_model_file, model_name
from quantship.progress import note, track
from quantship.runtime.base import RunnerOptions
from quantship.runtime.registry import get_runtime, tool_versions
from quantship.signoff.cluster import RayCluster, strip_ansi
from quantship.signoff.plan import PlanModel, SignoffPlan
from quantship.signoff.units import (
    Chunk,
    ModelWork,
    SignoffJob,
    UnitFailed,
    check_readable,
    chunk_spans,
    evaluate_chunk,
    failed_row,
    model_context,
    plan_data,
    todo_spans,
    unit_row,
    unit_state,
)
from quantship.targets import BuildContext, Target, get_target, parse_targets
from quantship.targets.post_training import build_searched
from quantship.targets.run import TARGET_ERRORS, load_for, remove_artifact

DEFAULT_MAX_RETRIES = 2  # a worker that dies (out of memory, node lost) is replaced this many times per task
PROBE_TIMEOUT_S = 300.0  # nodes answer the start-up check within this (a fresh worker imports Python first)
ATTEMPTS_DIR = ".ray-attempts"
RAY_ROW_FIELDS = ("executor", "nodes", "workers", "cpu_models", "retries")


@dataclass(frozen=True)
class _Run:
    """What every task of one run gets (small: the dataset travels once, through the object store)."""

    plan: SignoffPlan
    out_dir: Path  # absolute: workers have their own working directory
    cwd: str  # the driver's, for relative dataset and model paths where the node has it
    attempts: Path
    input_cache: InputCacheOptions  # the driver's (--input-cache, --no-input-cache)


# ------------------------------------------------------------------------------------------------ on workers


def _enter(run: _Run) -> None:
    if os.getcwd() != run.cwd and os.path.isdir(run.cwd):
        os.chdir(run.cwd)
    if cache.current_options() != run.input_cache:
        cache.configure(run.input_cache)


def _claim_attempt(folder: Path, key: str) -> int:
    """The number of this attempt at a task (marker files survive a worker that dies)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        try:
            os.close(os.open(folder / f"{key}.{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return n
        except FileExistsError:
            n += 1


def _where(attempt: int) -> dict[str, Any]:
    import ray

    ctx = ray.get_runtime_context()
    return {
        "node": ray.util.get_node_ip_address(),
        "node_id": ctx.get_node_id(),
        "host": socket.gethostname(),
        "worker": ctx.get_worker_id(),
        "pid": os.getpid(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "attempt": attempt,
    }


class _WorkerState:
    """What a worker process keeps between tasks: the job's listings, the models it loaded (with their tasks),
    and its last runner (chunks of one unit tend to follow each other on a worker)."""

    def __init__(self) -> None:
        self.listing: tuple[str, Any] | None = None
        self.models: collections.OrderedDict[tuple, tuple[Any, Any]] = collections.OrderedDict()
        self.runner: tuple[tuple, Any] | None = None

    def datasets(self, run: _Run, box: list[Any]) -> tuple[Any, Any]:
        """The dataset and its calibration / evaluation split, read here by path as the driver read them, and
        refused when this node sees other files than the driver did (the unit keys rest on the driver's view)."""
        import ray

        ref = box[0]
        if self.listing is None or self.listing[0] != ref.hex():
            seen = ray.get(ref)
            plan = run.plan
            dataset, split = plan_data(plan, parse_targets([plan.reference, *plan.targets], "plan targets"))
            here = _data_identity(dataset, split)
            if here != seen:
                what = next(k for k in here if here[k] != seen[k])
                raise ExecutorError(
                    f"the {what.replace('_', ' ')} of {plan.data} differs on this node from the driver's (other files, "
                    "sizes or times): every node must see the same data at the same path"
                )
            self.listing = (ref.hex(), (dataset, split))
        return self.listing[1]

    def remember(self, key: tuple, loaded: Any, task: Any) -> None:
        self.models[key] = (loaded, task)
        self.models.move_to_end(key)
        while len(self.models) > 2:
            self.models.popitem(last=False)

    def model(self, run: _Run, entry: PlanModel, preprocess: Any, dataset: Any) -> tuple[Any, Any]:
        key = _model_key(entry, preprocess)
        if key not in self.models:
            loaded = load_for(
                entry.name, entry.weights, preprocess, dataset, trust_savedmodel=run.plan.trust_savedmodel
            )
            self.remember(key, loaded, make_task(dataset, loaded, run.plan.anchors))
        self.models.move_to_end(key)
        return self.models[key]

    def active_runner(self, key: tuple, make: Any) -> tuple[Any, int]:
        """The runner for ``key`` (made and activated on first use) and the warm-up batches its chunk leaves out
        of the latency (the first batch a runner runs)."""
        if self.runner is not None and self.runner[0] == key:
            return self.runner[1], 0
        self.drop_runner()
        runner = make().activate()
        self.runner = (key, runner)
        return runner, 1

    def drop_runner(self) -> None:
        if self.runner is not None:
            with contextlib.suppress(Exception):
                self.runner[1].deactivate()
            self.runner = None


_WORKER = _WorkerState()


def _data_identity(dataset: Any, split: Any) -> dict[str, str]:
    """What identifies the data a run reads: the listing of the dataset, of the calibration images, and the
    evaluation images chosen."""
    return {
        "dataset_listing": dataset.listing_hash(),
        "calibration_images": split.calib.listing_hash(),
        "evaluation_images": split.evalset.keys_hash(),
    }


def _model_key(entry: PlanModel, preprocess: Any) -> tuple[str, str, str]:
    return entry.name, str(entry.weights), preprocess.hash()


def build_model(
    run: _Run, entry: PlanModel, preprocess: Any, data_box: list[Any], target_names: list[str]
) -> dict[str, Any]:
    """Ray task: build every listed target of one model, each exactly once, sharing the export and the
    statistics pass. A target that fails to build gets its error (its units fail, the others go on)."""
    _enter(run)
    attempt = _claim_attempt(run.attempts, f"build.{model_name(entry.name)}")
    began = time.time()
    plan = run.plan
    dataset, split = _WORKER.datasets(run, data_box)
    targets = parse_targets([plan.reference, *plan.targets], "plan targets")
    ctx, task = model_context(plan, targets, dataset, split, run.out_dir, entry, preprocess)
    _WORKER.remember(_model_key(entry, preprocess), ctx.loaded, task)
    out: dict[str, dict[str, Any]] = {}
    try:
        for t in targets:
            if t.name in target_names:
                try:
                    out[t.name] = {"artifact": build_searched(ctx, t)}
                except TARGET_ERRORS as exc:
                    out[t.name] = {"error": str(exc)}
    finally:
        ctx.close()
    return {"artifacts": out, "where": _where(attempt), "began": began, "ended": time.time()}


def evaluate_chunk_task(
    run: _Run,
    entry: PlanModel,
    preprocess: Any,
    target_name: str,
    built: dict[str, Any],
    data_box: list[Any],
    chunk: Chunk,
) -> dict[str, Any]:
    """Ray task: evaluate one chunk of a unit and store it (after the model's build, whose result ``built`` is).
    Returns where it ran, or the unit's error (the local executor's failed-row cases)."""
    _enter(run)
    state_dir, start = chunk.state, chunk.start
    attempt = _claim_attempt(run.attempts, f"{state_dir.name}.{start:08d}")
    began = time.time()
    result = built["artifacts"][target_name]
    if "error" in result:
        return {"skipped": True}
    plan = run.plan
    target = get_target(target_name)
    artifact: Artifact | None = result["artifact"]
    dataset, split = _WORKER.datasets(run, data_box)
    loaded, task = _WORKER.model(run, entry, preprocess, dataset)
    ctx = BuildContext(
        loaded, run.out_dir, runner_options=RunnerOptions(threads=plan.threads, providers=plan.ort_providers),
        trt=plan.tensorrt,
    )  # fmt: skip
    key = (
        _model_key(entry, preprocess),
        target.name,
        str(artifact.path) if artifact else None,
        (artifact.manifest if artifact else {}).get("sha256"),
    )
    where = _where(attempt)
    try:
        runner, warmup = _WORKER.active_runner(key, lambda: target.make_runner(ctx, artifact))
        write_json_atomic(state_dir / f"chunk-{start:08d}.json", {**where, "executor": "ray"})
        chunk = dataclasses.replace(chunk, warmup_batches=warmup)
        evaluate_chunk(plan, runner, target, loaded.preprocess, split.evalset, task, chunk)
    except (*TARGET_ERRORS, UnitFailed) as exc:
        _WORKER.drop_runner()
        return {"error": str(exc), "where": where}
    return {"where": where, "began": began, "ended": time.time()}


def probe_node(cwd: str, probe: str, token: str, paths: dict[str, str], versions: dict[str, str]) -> list[str]:
    """Ray task, once per node at start: what this node lacks to take part (nothing: an empty list)."""

    if os.path.isdir(cwd):
        os.chdir(cwd)
    folder = str(Path(probe).parent)
    try:
        seen = Path(probe).read_text()
    except OSError as exc:
        seen = f"({exc.strerror or type(exc).__name__})"
    problems = []
    if seen != token:
        problems.append(
            f"cannot see the output folder {folder} {seen if seen.startswith('(') else '(another folder is there)'}"
            ": every node must mount it at the same path (a shared filesystem)"
        )
    for what, path in paths.items():
        if not os.path.exists(path):
            problems.append(f"cannot read the {what} {path}: every node must see the data and models at the same path")
    here = tool_versions()
    for name, version in versions.items():
        if here.get(name) != version:
            problems.append(
                f"has {name} {here.get(name, 'missing')} where the driver has {version}: install the same versions on "
                "every node"
            )
    return problems


# ------------------------------------------------------------------------------------------------ the driver


@dataclass
class _Unit:
    model: str
    target: Target
    key: str
    state: Path  # as the driver names it (in rows)
    pending: set = field(default_factory=set)
    errors: dict[int, str] = field(default_factory=dict)
    built: dict[str, Any] | None = None


def _needs_gpu(target: Target) -> bool:
    return get_runtime(target.spec.backend).gpu


def gpu_type_to_use(nodes: list[dict[str, Any]]) -> str | None:
    """The GPU model every TensorRT task is pinned to when the cluster mixes models (an engine is built for the
    GPU it is built on): the one with the most GPUs. None when the GPUs are all alike (or unnamed)."""
    count: dict[str, int] = {}
    for n in nodes:
        if n["gpus"] and n.get("gpu_type"):
            count[n["gpu_type"]] = count.get(n["gpu_type"], 0) + n["gpus"]
    return max(sorted(count), key=lambda k: count[k]) if len(count) > 1 else None


def _one_line(exc: BaseException) -> str:
    """A Ray exception as one line without colour codes: the original exception where Ray carries it."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        text = f"{type(cause).__name__}: {cause}"
    else:
        text = strip_ansi(str(exc))
    lines = [ln.strip() for ln in strip_ansi(text).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


@dataclass
class RayExecutor:
    """Units as Ray tasks on a cluster (``address``) or on a local instance (``local_cpus`` CPUs).

    Args:
        address: ``HOST:PORT`` of the head node; None: a local instance (``RAY_ADDRESS`` is not read: a run goes
            to a cluster only when asked to by name).
        local_cpus: CPUs of a local instance (default: those of this process).
        local_gpus: GPUs of a local instance (default: Ray detects them).
        max_retries: Times a task whose worker died is run again (exceptions are never retried).
    """

    address: str | None = None
    local_cpus: int | None = None
    local_gpus: int | None = None
    max_retries: int = DEFAULT_MAX_RETRIES
    name: str = "ray"
    _record: dict[str, Any] = field(default_factory=dict)

    @property
    def description(self) -> str:
        return f"the Ray cluster at {self.address}" if self.address else "a local Ray instance (loopback only)"

    def record(self) -> dict[str, Any]:
        return dict(self._record) or {"executor": self.name}

    def run(self, job: SignoffJob, work: list[ModelWork]) -> Iterator[dict[str, Any]]:
        if not work:  # every unit is stored: no cluster needed
            self._record = {"executor": self.name, "nodes": 0, "workers": 0, "retries": 0}
            return
        with RayCluster(self.address, state_dir=job.out_dir, num_cpus=self.local_cpus, num_gpus=self.local_gpus) as c:
            yield from _RayRun(self, c, job, work).rows()


class _RayRun:
    """One run on a cluster: submit builds and chunks, collect them, make each unit's row when it is complete."""

    def __init__(self, executor: RayExecutor, cluster: RayCluster, job: SignoffJob, work: list[ModelWork]):
        self.ex, self.cluster, self.job, self.work = executor, cluster, job, work
        self.ray = cluster.ray
        self.out_abs = job.out_dir.resolve()
        attempts = self.out_abs / ATTEMPTS_DIR
        shutil.rmtree(attempts, ignore_errors=True)  # markers of an interrupted run (the lock is ours)

        self.run = _Run(job.plan, self.out_abs, os.getcwd(), attempts / secrets.token_hex(6), current_options())

        self.task = make_task(job.dataset)  # evaluates stored arrays (as the verdicts do)
        self.builds: dict[Any, tuple[ModelWork, list[_Unit]]] = {}
        self.chunks: dict[Any, tuple[_Unit, int, int]] = {}
        self.remaining: list[Any] = []
        self.ready_rows: list[dict[str, Any]] = []
        self.workers: set[tuple[str, str]] = set()
        self.nodes_used: set[str] = set()
        self.times: dict[str, float] = {}
        self.stored_chunks = 0
        self.chunk_task_s = 0.0  # the chunk tasks' own run time, summed (how busy the workers were)
        self.gpu_options: dict[str, Any] = {}  # an engine runs on the GPU model it was built on

    # ------------------------------------------------------------------------------------------- checks

    def check(self) -> list[dict[str, Any]]:
        plan, nodes = self.job.plan, self.cluster.nodes()
        where = self.cluster.describe()
        threads = plan.threads or 1
        if not nodes:
            raise ExecutorError(f"{where} has no node with CPUs")
        if max(n["cpus"] for n in nodes) < threads:
            raise ExecutorError(
                f"every task asks for {threads} CPUs (the plan's threads) but the largest node of {where} has "
                f"{max(n['cpus'] for n in nodes)}"
            )
        gpu_targets = sorted({t.name for w in self.work for t in w.todo if _needs_gpu(t)})
        if gpu_targets and not any(n["gpus"] for n in nodes):
            raise ExecutorError(f"{', '.join(gpu_targets)} run on a GPU, and {where} has no node with one")
        if gpu_targets and (gpu_type := gpu_type_to_use(nodes)):
            self.gpu_options = {"accelerator_type": gpu_type}
            note(f"Ray: the cluster mixes GPU models; TensorRT engines are built and run on {gpu_type} only")
        self._check_nodes_see(nodes)
        return nodes

    def _check_nodes_see(self, nodes: list[dict[str, Any]]) -> None:
        """Every node sees the output folder (a file the driver just wrote), the data and the model files, and
        has the driver's versions of the libraries the numbers depend on."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token = secrets.token_hex(16)
        probe = self.out_abs / f".ray-probe-{token[:12]}"
        write_text_atomic(probe, token)
        paths = {}
        if len(self.job.evalset):
            paths["dataset image"] = self.job.evalset.samples[0].key.split("#", 1)[0]
        for w in self.work:
            if is_model_file(w.entry.name):
                paths[f"model file of {model_name(w.entry.name)}"] = w.entry.name
        versions = tool_versions()
        fn = self.ray.remote(probe_node)
        refs = [
            fn.options(
                num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["node_id"], soft=False)
            ).remote(self.run.cwd, str(probe), token, paths, versions)
            for n in nodes
        ]
        try:
            answers = self.ray.get(refs, timeout=PROBE_TIMEOUT_S)
        except self.ray.exceptions.GetTimeoutError:
            raise ExecutorError(
                f"the nodes of {self.cluster.describe()} did not answer the start-up check within "
                f"{PROBE_TIMEOUT_S:.0f} s"
            ) from None
        except self.ray.exceptions.RayError as exc:
            raise ExecutorError(f"the start-up check on the Ray nodes failed: {_one_line(exc)}") from None
        finally:
            probe.unlink(missing_ok=True)
        for n, problems in zip(nodes, answers):
            if problems:
                raise ExecutorError(f"the Ray worker on node {n['ip']} ({n['host']}) {problems[0]}")

    # ------------------------------------------------------------------------------------------- submit

    def submit(self) -> None:
        ray, plan, job = self.ray, self.job.plan, self.job
        common = {"num_cpus": plan.threads or 1, "max_retries": self.ex.max_retries, "retry_exceptions": False}
        # Workers read the data themselves, by path, as the driver did (plan_data); what they get is what the
        # driver saw, to check against. Once, nested so that tasks fetch it (and workers keep it).
        info = _data_identity(job.dataset, job.split)
        data_box = [ray.put(info)]
        build_fn, chunk_fn = ray.remote(build_model), ray.remote(evaluate_chunk_task)
        for w in self.work:
            name = model_name(w.entry.name)
            gpu = any(_needs_gpu(t) for t in w.todo)
            ref = build_fn.options(
                **common, num_gpus=int(gpu), **(self.gpu_options if gpu else {}), name=f"quantship build {name}"
            ).remote(self.run, w.entry, w.preprocess, data_box, [t.name for t in w.todo])
            units = []
            for t in w.todo:
                key = w.keys[t.name]
                unit = _Unit(name, t, key, unit_state(job.out_dir, name, t.name, key))
                state_abs = unit_state(self.out_abs, name, t.name, key)
                todo = todo_spans(plan, job.evalset, unit.state)
                self.stored_chunks += len(chunk_spans(plan, job.evalset)) - len(todo)
                for s, e in todo:
                    gpu = _needs_gpu(t)
                    cref = chunk_fn.options(
                        **common,
                        num_gpus=int(gpu),
                        **(self.gpu_options if gpu else {}),
                        name=f"quantship {name} {t.name} chunk {s}",
                    ).remote(self.run, w.entry, w.preprocess, t.name, ref, data_box, Chunk(state_abs, s, e))
                    self.chunks[cref] = (unit, s, e)
                    unit.pending.add(cref)
                units.append(unit)
            self.builds[ref] = (w, units)
        self.remaining = [*self.builds, *self.chunks]

    # ------------------------------------------------------------------------------------------- collect

    def rows(self) -> Iterator[dict[str, Any]]:
        t0 = time.perf_counter()
        nodes = self.check()
        self.submit()
        note(
            f"Ray: {len(self.builds)} build task(s), {len(self.chunks)} chunk task(s) ({self.stored_chunks} chunk(s) "
            f"stored before) on {len(nodes)} node(s), {sum(n['cpus'] for n in nodes)} CPU(s)"
        )
        self.times["start"] = t0
        try:
            for ref in track(self._chunk_completions(), total=len(self.chunks), desc="chunks"):
                self._chunk_done(ref)
                while self.ready_rows:
                    yield self.ready_rows.pop(0)
            while self.ready_rows:
                yield self.ready_rows.pop(0)
        except BaseException:
            self._cancel()
            raise
        finally:
            self._write_record(nodes, time.perf_counter() - t0)

    def _chunk_completions(self) -> Iterator[Any]:
        ray = self.ray
        while self.remaining:
            ready, self.remaining = ray.wait(self.remaining, num_returns=1)
            if self.remaining:
                more, self.remaining = ray.wait(self.remaining, num_returns=len(self.remaining), timeout=0)
                ready += more
            for ref in ready:
                if ref in self.builds:
                    self._built(ref)
                else:
                    yield ref

    def _get(self, ref: Any, what: str) -> Any:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            found = re.search(r"\bip=([^\s,)]+)", strip_ansi(str(exc)))  # the dual exception keeps only the text
            node = found.group(1) if found else "?"
            raise ExecutorError(f"{what} failed on the Ray worker at {node}: {_one_line(exc)}") from None
        except self.ray.exceptions.RayError as exc:
            raise ExecutorError(
                f"{what}: its Ray worker died {self.ex.max_retries + 1} time(s) (retries allowed: "
                f"{self.ex.max_retries}): {_one_line(exc)}"
            ) from None

    def _built(self, ref: Any) -> None:
        w, units = self.builds[ref]
        name = model_name(w.entry.name)
        res = self._get(ref, f"building the targets of {name}")
        self._ran(res)
        self.times["builds_done"] = time.perf_counter()
        for unit in units:
            unit.built = res["artifacts"][unit.target.name]
            self._maybe_finish(unit)

    def _chunk_done(self, ref: Any) -> None:
        unit, start, end = self.chunks[ref]
        res = self._get(ref, f"unit {unit.model} {unit.target.name} (images {start}-{end})")
        unit.pending.discard(ref)
        if "error" in res:
            unit.errors[start] = res["error"]
        if "began" in res:
            self.chunk_task_s += res["ended"] - res["began"]
        self._ran(res)
        self._maybe_finish(unit)

    def _ran(self, res: dict[str, Any]) -> None:
        where = res.get("where")
        if where:
            self.workers.add((where["node_id"], where["worker"]))
            self.nodes_used.add(where["node_id"])

    def _maybe_finish(self, unit: _Unit) -> None:
        if unit.built is None or unit.pending:
            return
        art = unit.built.get("artifact")
        if art is not None and Path(art.path).is_relative_to(self.out_abs):
            # The driver names paths as it was given the folder (rows match the local executor's).
            art = Artifact(self.job.out_dir / Path(art.path).relative_to(self.out_abs), art.manifest)
        error = unit.built.get("error") or (unit.errors[min(unit.errors)] if unit.errors else None)
        if error is None:
            try:
                row = unit_row(self.job.plan, unit.model, unit.target, unit.key, unit.state, art, self.task)
            except (*TARGET_ERRORS, UnitFailed) as exc:
                error = str(exc)
            else:
                check_readable(row, unit.target, unit.state)
                self.ready_rows.append({**row, **_ray_fields(unit.state)})
                return
        remove_artifact(art)
        note(f"FAILED {unit.model} {unit.target.name}: {error}")
        self.ready_rows.append(failed_row(unit.model, unit.target, unit.key, error))

    def _cancel(self) -> None:
        for ref in self.remaining:
            with contextlib.suppress(Exception):
                self.ray.cancel(ref)
        with contextlib.suppress(Exception):
            if self.remaining:
                self.ray.wait(self.remaining, num_returns=len(self.remaining), timeout=15)

    def _write_record(self, nodes: list[dict[str, Any]], total_s: float) -> None:
        retried = _retries(self.run.attempts)
        shutil.rmtree(self.run.attempts.parent, ignore_errors=True)
        built = self.times.get("builds_done", self.times["start"]) - self.times["start"]
        self.ex._record = {
            "executor": "ray",
            "cluster": self.cluster.describe(),
            "nodes": len(nodes),
            "node_addresses": sorted({n["ip"] for n in nodes}),
            "cpus": sum(n["cpus"] for n in nodes),
            "gpus": sum(n["gpus"] for n in nodes),
            "workers": len(self.workers),
            "max_retries": self.ex.max_retries,
            "retries": sum(retried.values()),
            "retried": [f"{_task_name(k)} ({n} retr{'y' if n == 1 else 'ies'})" for k, n in sorted(retried.items())],
            "timings": {
                "build_s": built,
                "evaluate_s": total_s - built,
                "total_s": total_s,
                "chunk_tasks_s": self.chunk_task_s,
            },  # fmt: skip
            **({"gpu_model": self.gpu_options["accelerator_type"]} if self.gpu_options else {}),
        }


def _retries(folder: Path) -> dict[str, int]:
    """Retries per task key, from the attempt markers (``<key>.<n>``)."""
    last: dict[str, int] = {}
    for p in folder.glob("*.*") if folder.is_dir() else ():
        key, _, n = p.name.rpartition(".")
        if n.isdigit():
            last[key] = max(last.get(key, 0), int(n))
    return {k: n - 1 for k, n in last.items() if n > 1}


def _task_name(key: str) -> str:
    """An attempt key (``build.<model>``, ``<unit folder>.<first image>``) as the report names the task."""
    if key.startswith("build."):
        return f"build of {key[len('build.') :]}"
    head, _, tail = key.rpartition(".")
    return f"{head} chunk {int(tail)}" if tail.isdigit() else key


def _ray_fields(state: Path) -> dict[str, Any]:
    """Where a unit's stored chunks were computed (the records of the chunks this executor computed)."""
    found = (_read_record(p) for p in sorted(state.glob("chunk-*.json")) if p.with_suffix(".npz").is_file())
    records = [r for r in found if r]
    return {
        "executor": "ray",
        "nodes": sorted({r["node"] for r in records}),
        "workers": len({(r["node_id"], r["worker"]) for r in records}),
        "cpu_models": sorted({r["cpu"] for r in records}),
        "retries": sum(max(int(r.get("attempt", 1)) - 1, 0) for r in records),
    }


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"node", "node_id", "worker", "cpu"} <= set(record) else None
