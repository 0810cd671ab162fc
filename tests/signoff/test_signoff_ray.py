"""Sign-off on Ray: the same rows and verdicts as the local executor, a killed driver resumed with nothing
recomputed and nothing left running, one-line errors; a local instance that listens on loopback only.

One local Ray instance (2 CPUs) serves the session; every Ray address here is on 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_PREPROCESS, write_synset_dataset

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed (quantship[ray])")

# Fields that say where and how fast a unit ran, not what it computed; paths name the output folder.
WHERE_FIELDS = {"latency_ms", "executor", "nodes", "workers", "cpu_models", "retries"}
PATH_FIELDS = ("state", "artifact", "manifest")


@pytest.fixture(scope="session")
def ray_instance():
    """The session's local Ray instance (sign-off runs in this process use it)."""
    from quantship.signoff.cluster import RayCluster

    token_file = Path.home() / ".ray" / "auth_token"
    had_token = token_file.exists()
    cluster = RayCluster(num_cpus=2, num_gpus=0, ray_prints_to_stderr=False).start()  # pytest owns stdout
    yield cluster
    cluster.stop()
    assert token_file.exists() == had_token  # the token travels in the environment, never to the home folder


@pytest.fixture(scope="module")
def models(trained_tiny, tmp_path_factory):
    """Two small classifiers: the trained tiny CNN and an under-trained one (so it gets some images wrong)."""
    import keras

    from conftest import _tiny_model, synthetic_set, tf_preprocess

    keras.utils.set_random_seed(5)
    x, y = synthetic_set(20, seed=2)
    weak = _tiny_model()
    weak.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    weak.fit(tf_preprocess(x), y, epochs=1, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("weak") / "weak.keras"
    weak.save(path)
    return [trained_tiny[1], path]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_synset_dataset(tmp_path_factory.mktemp("ray-data"), 20, seed=11)


def _plan(models, data, targets, executor="ray", limit=32, chunk=8, **extra):
    from quantship.signoff.plan import SignoffPlan

    mode, size, crop = (kv.split("=")[1] for kv in TINY_PREPROCESS.split(","))
    pre = {"mode": mode, "size": int(size), "crop_pct": float(crop)}
    return {
        "name": "ray-plan",
        "executor": executor,
        "dataset": f"imagenet:{data}",
        "limit": limit,
        "chunk_images": chunk,
        "calibration": {"num_images": 12},
        "models": [{"name": str(m), "preprocess": pre} for m in models],
        "targets": targets,
        "gates": [{"metric": "top1", "max_drop_points": 5}],
        "bench": False,  # the bench pass is tested in test_signoff_report.py
        **extra,
    }, SignoffPlan


def _load_plan(d):
    d, cls = d
    return cls.from_dict(d)


def _rows(out: Path) -> dict[str, dict]:
    return {r["unit_key"]: r for r in map(json.loads, (out / "signoff.jsonl").read_text().splitlines())}


def _comparable(row: dict, out: Path) -> dict:
    row = {k: v for k, v in row.items() if k not in WHERE_FIELDS}
    for k in PATH_FIELDS:
        if row.get(k):
            row[k] = str(Path(row[k]).relative_to(out))
    return row


def _chunks(out: Path) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "state").glob("*/chunk-*.npz")}


@needs_ray
def test_local_instance_listens_on_loopback_only(ray_instance):
    import psutil
    import ray

    assert ray_instance.kind == "local instance" and ray.util.get_node_ip_address() == "127.0.0.1"
    assert ray.get(ray.remote(lambda: os.getpid()).options(num_cpus=1).remote()) != os.getpid()  # a worker too
    sockets = ray_instance.listening_sockets()
    names = {s["name"] for s in sockets}
    assert {"gcs_server", "raylet"} <= names, names
    assert all(s["loopback"] for s in sockets), [s for s in sockets if not s["loopback"]]
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:  # and no connection to anything but loopback
        for c in p.net_connections(kind="inet"):
            assert not c.raddr or c.raddr.ip.split("%")[0] in ("127.0.0.1", "::1", "::ffff:127.0.0.1"), (p, c)


@needs_ray
def test_ray_rows_and_verdicts_equal_the_local_executor(ray_instance, models, images, tmp_path):
    from quantship.evaluate.report import build_report
    from quantship.signoff.run import signoff
    from quantship.signoff.units import load_chunks

    targets = ["tflite-fp32", "tflite-int8", "onnx-fp32"]
    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    local_rows, local_verdicts = signoff(_load_plan(_plan(models, images, targets, "local")), local_out)
    ray_rows, ray_verdicts = signoff(_load_plan(_plan(models, images, targets, "ray")), ray_out)

    assert len(ray_rows) == 8 and all(r["status"] == "ok" for r in ray_rows)
    assert [_comparable(r, ray_out) for r in ray_rows] == [_comparable(r, local_out) for r in local_rows]
    assert ray_verdicts == local_verdicts
    assert (ray_out / "verdicts.jsonl").read_text() == (local_out / "verdicts.jsonl").read_text()
    assert any(r["top1"] < 1.0 for r in ray_rows)  # the weak model errs: the comparison has teeth
    for lr, rr in zip(local_rows, ray_rows):  # every stored per-image array, bit for bit
        a, b = load_chunks(Path(lr["state"])), load_chunks(Path(rr["state"]))
        assert a.keys() == b.keys()
        for k in a.keys() - {"seconds"}:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{rr['model']} {rr['target']} {k}")
        assert rr["executor"] == "ray" and rr["nodes"] == ["127.0.0.1"] and rr["workers"] >= 1
        assert rr["cpu_models"] and rr["retries"] == 0
        records = sorted(Path(rr["state"]).glob("chunk-*.json"))
        assert len(records) == 4 and all(json.loads(p.read_text())["cpu"] == rr["cpu_models"][0] for p in records)
    # One build per model: every artifact written once (its manifest too).
    assert sorted(p.name for p in (ray_out / "artifacts").iterdir()) == sorted(
        p.name for p in (local_out / "artifacts").iterdir()
    )
    env = json.loads((ray_out / "environment.json").read_text())["executor"]
    assert env["executor"] == "ray" and env["nodes"] == 1 and 1 <= env["workers"] <= 2
    assert env["retries"] == 0 and env["max_retries"] == 2
    md, _ = build_report(ray_out)
    assert "Executor: ray, 1 node(s)" in md.read_text()
    assert not (ray_out / ".ray-attempts").exists() and not list(ray_out.glob(".ray-probe-*"))
    # A second run finds everything stored and computes nothing.
    before = _chunks(ray_out)
    signoff(_load_plan(_plan(models, images, targets, "ray")), ray_out)
    assert _chunks(ray_out) == before


def _clean_env() -> dict[str, str]:
    """This process's environment without the session instance's settings (the child starts its own)."""
    from quantship.signoff.cluster import loopback_env

    return {k: v for k, v in os.environ.items() if k not in loopback_env("") and not k.startswith("RAY_")}


@needs_ray
def test_killed_driver_resumes_with_nothing_recomputed_and_no_ray_process_left(ray_instance, models, images, tmp_path):
    import yaml

    from quantship.signoff.cluster import STATE_FILE, processes_using
    from quantship.signoff.run import signoff

    plan = _plan(models[:1], images, ["tflite-fp32"], limit=48, chunk=4, batch_size=1)
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan[0]))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantship", "signoff", str(plan_file), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_clean_env(),
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "state").exists() and len(list((out / "state").glob("*/chunk-*.npz"))) >= 2:
            break
        if proc.poll() is not None:
            pytest.fail("the sign-off finished before it could be killed")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((out / STATE_FILE).read_text())  # the killed run's instance, recorded for the next run
    assert processes_using(state["temp_dir"])  # its agents outlive the driver (by about a minute)
    before = _chunks(out)  # a chunk its dying workers were writing lands whole or not at all
    assert 2 <= len(before) < 24

    rows, _ = signoff(_load_plan(plan), out)  # resumed on the session's instance
    assert not processes_using(state["temp_dir"]) and not Path(state["root"]).exists()
    assert not (out / STATE_FILE).exists()
    after = _chunks(out)
    assert all(after[p] == v for p, v in before.items()), "a stored chunk was computed again"
    assert len(after) == 24 and [r["images"] for r in rows] == [48, 48]


@needs_ray
def test_a_worker_side_exception_is_one_line_naming_the_unit(ray_instance, models, images, tmp_path, capfd):
    import yaml

    from quantship.cli import main
    from quantship.data.datasets import load_dataset, split_calibration
    from quantship.models.loading import resolve_preprocess
    from quantship.signoff.units import unit_inputs, unit_key, unit_state

    plan_dict = _plan(models[:1], images, ["tflite-fp32"], limit=16)
    plan = _load_plan(plan_dict)
    (plan_file := tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan_dict[0]))
    entry, out = plan.models[0], tmp_path / "out"
    calib, evalset = split_calibration(load_dataset(plan.data), 0, plan.limit, 0)  # no target calibrates
    inputs = unit_inputs(plan, entry, resolve_preprocess(entry.name, None, entry.preprocess), evalset, calib)
    # A folder where the worker stores chunk 8 of the reference: writing it fails on the worker.
    (unit_state(out, "tiny", "keras-fp32", unit_key(plan, entry, "keras-fp32", inputs)) / "chunk-00000008.npz").mkdir(
        parents=True
    )
    code = main(["signoff", str(plan_file), "--out", str(out)])
    err = capfd.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("quantship signoff: error: unit tiny keras-fp32 (images 8-16) failed on the Ray worker at ")
    assert "IsADirectoryError" in err and "\x1b[" not in err


@needs_ray
def test_a_folder_a_worker_cannot_see_and_an_unreachable_cluster_are_one_line_errors(
    ray_instance, models, images, tmp_path, capfd, monkeypatch
):
    import yaml

    import quantship.signoff.ray_executor as signoff_ray
    from quantship.cli import main

    (plan_file := tmp_path / "plan.yaml").write_text(yaml.safe_dump(_plan(models[:1], images, ["tflite-fp32"])[0]))
    # The driver's probe file never reaches the workers' view of the folder (as on a disk only the driver has).
    monkeypatch.setattr(signoff_ray, "write_text_atomic", lambda path, text: path)
    assert main(["signoff", str(plan_file), "--out", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"cannot see the output folder {tmp_path / 'out'} (No such file or directory)" in err
    assert "every node must mount it at the same path" in err
    monkeypatch.undo()

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    code = main(["signoff", str(plan_file), "--out", str(tmp_path / "out2"), "--ray-address", f"127.0.0.1:{port}"])
    err = capfd.readouterr().err.strip()
    assert code == 2 and time.perf_counter() - t < 30
    assert err == (
        f"quantship signoff: error: cannot reach the Ray cluster at 127.0.0.1:{port} (connection refused): start it "
        "with `ray start --head` on the head node, or fix --ray-address"
    )
    assert main(["signoff", str(plan_file), "--out", str(tmp_path / "out3"), "--ray-address", "ray://x:1"]) == 2
    assert "give the head node's address as HOST:PORT" in capfd.readouterr().err


def test_the_executor_comes_from_the_plan_or_an_address_never_from_ray_address_alone(monkeypatch, tmp_path):
    from quantship.errors import ConfigError
    from quantship.signoff.ray_executor import RayExecutor
    from quantship.signoff.run import make_executor
    from quantship.signoff.units import LocalExecutor

    (model := tmp_path / "m.keras").write_bytes(b"")  # plans are checked before they run: the file must exist
    plan = _load_plan(_plan([model], "/data", ["tflite-fp32"], executor="local"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert isinstance(make_executor(plan), LocalExecutor)
    assert make_executor(plan, "127.0.0.1:7000").address == "127.0.0.1:7000"
    ray_plan = _load_plan(_plan([model], "/data", ["tflite-fp32"], executor="ray"))
    assert isinstance(ex := make_executor(ray_plan), RayExecutor) and ex.address is None  # a local instance
    with pytest.raises(ConfigError, match="executor: expected one of local, ray, got 'spark'"):
        _load_plan(_plan([model], "/data", ["tflite-fp32"], executor="spark"))


def test_retries_and_where_chunks_ran_are_counted_from_their_records(tmp_path):
    from quantship.evaluate.report import _executor_text
    from quantship.signoff.ray_executor import _claim_attempt, _ray_fields, _retries, _task_name

    attempts = tmp_path / "attempts"
    assert [_claim_attempt(attempts, "u.00000008") for _ in range(3)] == [1, 2, 3]  # a worker died twice
    assert _claim_attempt(attempts, "u.00000000") == 1
    assert _retries(attempts) == {"u.00000008": 2}
    assert _task_name("u.00000008") == "u chunk 8" and _task_name("build.tiny") == "build of tiny"
    state = tmp_path / "state"
    state.mkdir()
    for start, node, worker, attempt in ((0, "10.0.0.1", "w1", 1), (8, "10.0.0.2", "w2", 3), (16, "10.0.0.2", "w2", 1)):
        record = {"node": node, "node_id": node, "worker": worker, "cpu": f"CPU {node}", "attempt": attempt}
        (state / f"chunk-{start:08d}.json").write_text(json.dumps(record))
        if start != 16:  # a chunk whose task wrote its record but not its result does not count
            (state / f"chunk-{start:08d}.npz").write_bytes(b"")
    assert _ray_fields(state) == {
        "executor": "ray", "nodes": ["10.0.0.1", "10.0.0.2"], "workers": 2,
        "cpu_models": ["CPU 10.0.0.1", "CPU 10.0.0.2"], "retries": 2,
    }  # fmt: skip
    text = _executor_text(
        {"executor": "ray", "cluster": "c", "nodes": 2, "workers": 3, "cpus": 8, "gpus": 0, "retries": 2,
         "max_retries": 2, "retried": ["u.00000008 (2 retries)"]}
    )  # fmt: skip
    assert text == (
        "ray, 2 node(s), 3 worker(s) (c; 8 CPUs, 0 GPUs); 2 task retries (at most 2 per task): u.00000008 (2 retries)"
    )


def test_tensorrt_tasks_stay_on_one_gpu_model_when_the_cluster_mixes_them():
    from quantship.signoff.ray_executor import gpu_type_to_use

    node = {"cpus": 8, "gpus": 0, "gpu_type": None}
    assert gpu_type_to_use([node, {**node, "gpus": 2, "gpu_type": "A100"}]) is None  # one model: no pinning
    mixed = [{**node, "gpus": 1, "gpu_type": "T4"}, {**node, "gpus": 2, "gpu_type": "A100"}, node]
    assert gpu_type_to_use(mixed) == "A100"
