"""bench and eval on a device over SSH (issue 22), against a real OpenSSH server on 127.0.0.1.

The "device" is a Python environment holding numpy, LiteRT and ONNX Runtime only (linked from this venv): neither
quantship nor TensorFlow can be imported there, so every run proves the device runner is self-contained. The
server (Debian's openssh-server) runs with a throwaway host key and user key and key-only authentication; the
user's HOME on the device is a temporary folder (set through authorized_keys), so the device cache starts empty.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_PREPROCESS

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
DEVICE_PACKAGES = ("numpy", "ai_edge_litert", "onnxruntime")
ODD_NAME = 'tiny it\'s "odd"; $(touch PWNED) `x`.tflite'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device_env(root: Path, packages: tuple[str, ...]) -> Path:
    """A venv of the base interpreter holding only ``packages`` (and their .libs / dist-info) of this venv."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(root)], check=True, capture_output=True)
    (site,) = root.glob("lib/python3*/site-packages")
    ours = Path(np.__file__).parent.parent
    for name in packages:
        for p in ours.glob(f"{name}*"):
            if p.name == name or p.name.startswith((f"{name}.libs", f"{name}-")):
                (site / p.name).symlink_to(p)
    return root / "bin" / "python"


class Device:
    """The server, keys and device environments."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"
        self.home.mkdir()
        self.port = _free_port()
        keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
        for name in ("host_key", "other_host_key", "user_key", "stranger_key"):
            subprocess.run([*keygen, "-f", str(root / name)], check=True)
        pub = (root / "user_key.pub").read_text().strip()
        # HOME points the device at a fresh folder (and keeps the real user's shell start-up files out of it).
        (root / "authorized_keys").write_text(f'environment="HOME={self.home}" {pub}\n')
        host = (root / "host_key.pub").read_text().split()[:2]
        other = (root / "other_host_key.pub").read_text().split()[:2]
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {' '.join(host)}\n")
        self.wrong_known_hosts = root / "wrong_known_hosts"
        self.wrong_known_hosts.write_text(f"[127.0.0.1]:{self.port} {' '.join(other)}\n")
        (root / "sshd_config").write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {root / 'host_key'}",
                    f"AuthorizedKeysFile {root / 'authorized_keys'}",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "UsePAM no",
                    "StrictModes no",
                    "PermitRootLogin prohibit-password",
                    "PermitUserEnvironment yes",
                    f"PidFile {root / 'sshd.pid'}",
                    "LogLevel ERROR",
                ]
            )
            + "\n"
        )
        self.python = _device_env(root / "device-full", DEVICE_PACKAGES)
        self.python_numpy_only = _device_env(root / "device-numpy", ("numpy",))
        self.python_bare = _device_env(root / "device-bare", ())
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stderr=open(root / "sshd.log", "wb")
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((root / "sshd.log").read_text())
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("sshd did not listen")

    @property
    def url(self) -> str:
        return f"ssh://{getpass.getuser()}@127.0.0.1:{self.port}"

    def args(self, python: Path | None = None, key: str = "user_key", known_hosts: Path | None = None) -> list[str]:
        return [
            "--remote",
            self.url,
            "--remote-python",
            str(python or self.python),
            "--ssh-key",
            str(self.root / key),
            "--ssh-option",
            f"UserKnownHostsFile={known_hosts or self.known_hosts}",
        ]

    def options(self, **kw):
        from quantship.config import RemoteOptions

        return RemoteOptions(
            self.url,
            python=str(self.python),
            ssh_key=self.root / "user_key",
            ssh_options=(f"UserKnownHostsFile={self.known_hosts}",),
            **kw,
        )

    @property
    def base(self) -> Path:
        return self.home / ".cache" / "quantship-remote"

    def sessions(self) -> list[Path]:
        return sorted(self.base.glob("run-*"))

    def session_children(self) -> list[int]:
        """PIDs of the server's per-connection processes (children of the sshd this fixture started)."""
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                out.append(int(stat.parent.name))
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="session")
def device(tmp_path_factory):
    if not Path(SSHD).is_file() or shutil.which("ssh") is None:
        pytest.skip("OpenSSH server or client not installed (apt-get install -y openssh-server)")
    try:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation folder
    except OSError as exc:
        pytest.skip(f"sshd cannot start here: /run/sshd: {exc}")
    try:
        dev = Device(tmp_path_factory.mktemp("sshd"))
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"sshd cannot start here: {exc}")
    yield dev
    dev.stop()


def _main(argv: list[str]) -> int:
    from quantship.cli import main

    return main(argv)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# What a measurement (or the machine's state around it) decides; everything else in a row must be equal.
MEASURED = ("latency_", "runtime_ms_", "throughput_ips_", "ratio_", "load_average_", "cpu_mhz_")
MEASURED_KEYS = {"init_ms", "peak_rss_mb", "input_conversion_ms", "first_inference_ms", "stable", "unstable_reason"}
MEASURED_KEYS |= {"round_p50_ms", "rounds", "stopped_by", "warmup_queries", "iterations", "where", "remote"}
MEASURED_KEYS |= {"settle_ms_p50"}


def _non_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in MEASURED_KEYS and not k.startswith(MEASURED)}


@pytest.fixture(scope="session")
def evaluated(device, trained_tiny, synset_dataset, tmp_path_factory):
    """The tiny model evaluated locally, then on the device with the same artifacts (same --out: reused)."""
    out = tmp_path_factory.mktemp("remote-eval")
    _, model = trained_tiny
    argv = [
        "eval",
        "--model",
        str(model),
        "--preprocess",
        TINY_PREPROCESS,
        "--data",
        f"imagenet:{synset_dataset}",
        "--targets",
        "keras-fp32,tflite-int8,onnx-fp32,qdq-int8-max",
        "--calib-images",
        "8",
        "--limit",
        "16",
        "--threads",
        "1",
        "--out",
        str(out),
        "-q",
    ]
    assert _main(argv) == 0
    local = _rows(out / "results.jsonl")
    assert _main(argv + device.args()) == 0
    remote = _rows(out / "results.jsonl")
    artifacts = {r["target"]: Path(r["artifact"]) for r in local if r.get("artifact")}
    return local, remote, artifacts


def test_eval_remote_rows_match_local(evaluated):
    """Every accuracy field of a row measured on the device equals the local row; the reference ran here."""
    local, remote, _ = evaluated
    assert [r["target"] for r in remote] == [r["target"] for r in local]
    for lr, rr in zip(local, remote):
        assert rr["status"] == "ok", rr.get("error")
        if lr["target"] == "keras-fp32":
            assert rr["where"] == "local" and "remote" not in rr
        else:
            assert rr["where"] == "remote" and lr["where"] == "local"
            assert rr["remote"]["url"].startswith("ssh://") and rr["remote"]["cpu_count"] >= 1
            assert {"cpu", "cpu_flags", "platform", "libraries", "machine", "python"} <= set(rr["remote"])
        same = {k: v for k, v in lr.items() if k not in ("where", "remote", "latency_ms", "eval_spec_hash")}
        assert {k: rr.get(k) for k in same} == same
    qdq = next(r for r in remote if r["target"] == "qdq-int8-max")
    assert qdq["session_config"] == {"session.disable_quant_qdq": "1"}


def test_remote_runner_outputs_identical(device, evaluated, trained_tiny):
    """Outputs computed on the device equal the local runner's bit for bit, float and raw int8 feeds alike."""
    from quantship.remote.host import DeviceSession, RemoteRunner
    from quantship.runtime.base import RunnerOptions
    from quantship.runtime.registry import make_runner

    _, _, artifacts = evaluated
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)
    with DeviceSession(device.options()) as session:
        for target, runtime, config in (
            ("tflite-int8", "tflite", ()),
            ("onnx-fp32", "onnx", ()),
            ("qdq-int8-max", "onnx", (("session.disable_quant_qdq", "1"),)),
        ):
            options = RunnerOptions(threads=1, session_config=config)
            with make_runner(artifacts[target], options) as here:
                remote = RemoteRunner(session, artifacts[target], runtime, options, target)
                with remote:
                    assert remote.input_metadata() == here.input_metadata()
                    for raw in (False, True):
                        m = here.input_metadata()[0]
                        feed = x if not raw or not m.quantized else np.round(x / m.scale + m.zero_point).astype(m.dtype)
                        a, b = here.infer(feed, raw=raw), remote.infer(feed, raw=raw)
                        assert a.keys() == b.keys()
                        for k in a:
                            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), (target, raw, k)
                    assert remote.last_round_trip_time >= remote.last_query_time > 0


def test_bench_remote_matches_local_and_reuses_artifacts(device, evaluated, tmp_path):
    """bench of a .tflite (named with spaces, quotes, ``;``, ``$( )`` and backticks) and an .onnx: the device rows
    equal the local ones in every non-timing field; the second run copies nothing; nothing ran from the name."""
    _, _, artifacts = evaluated
    odd = tmp_path / ODD_NAME
    shutil.copy(artifacts["tflite-int8"], odd)
    common = ["bench", "--artifact", str(odd), "--artifact", str(artifacts["onnx-fp32"]), "--threads", "1"]
    common += ["--min-queries", "20", "--min-seconds", "0", "--warmup", "0", "--min-rounds", "2", "--max-seconds", "1"]
    common += ["-q"]
    assert _main(common + ["--out", str(tmp_path / "local")]) == 0
    assert _main(common + ["--out", str(tmp_path / "r1")] + device.args()) == 0
    assert _main(common + ["--out", str(tmp_path / "r2")] + device.args()) == 0
    local, first, second = (_rows(tmp_path / d / "bench.jsonl") for d in ("local", "r1", "r2"))
    for lr, r1, r2 in zip(local, first, second):
        assert lr["where"] == "local" and r1["where"] == r2["where"] == "remote"
        assert _non_timing(r1) == _non_timing(lr) == _non_timing(r2)
        assert r1["iterations"] >= 20 and r1["latency_ms_p50"] > 0 and r1["rounds"] >= 2
        assert r2["remote"]["artifact_copied"] is False
    assert first[0]["remote"]["artifact_copied"] is True
    env = json.loads((tmp_path / "r1" / "environment.json").read_text())
    assert env["remote"]["url"] == device.url
    assert not list(tmp_path.rglob("PWNED")) and not list(device.home.rglob("PWNED")) and not Path("PWNED").exists()
    cached = list((device.base / "artifacts").rglob(ODD_NAME))
    assert len(cached) == 1 and cached[0].read_bytes() == odd.read_bytes()
    assert not device.sessions(), "the session folder was left on the device"
    mode = (device.base.stat().st_mode & 0o777, cached[0].parent.stat().st_mode & 0o777)
    assert mode == (0o700, 0o700)


def test_no_cache_copies_again_and_leaves_nothing(device, evaluated, tmp_path):
    _, _, artifacts = evaluated
    argv = ["bench", "--artifact", str(artifacts["onnx-fp32"]), "--min-queries", "5", "--min-seconds", "0"]
    argv += ["--min-rounds", "2", "--warmup", "0", "-q", "--out", str(tmp_path), "--remote-no-cache", *device.args()]
    assert _main(argv) == 0
    assert _rows(tmp_path / "bench.jsonl")[0]["remote"]["artifact_copied"] is True
    assert not device.sessions()


# ------------------------------------------------------------------------------------------- errors
def _fails(argv: list[str], capfd, message: str) -> str:
    capfd.readouterr()
    code = _main(argv)
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, lines
    assert message in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def onnx_file(evaluated):
    return evaluated[2]["onnx-fp32"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("unreachable", "unreachable: connection refused"),
        ("auth", "authentication refused"),
        ("host-key", "host key has CHANGED"),
        ("unknown-host-key", "not in known_hosts"),
        ("interpreter", "no Python interpreter"),
        ("numpy", "pip install numpy"),
        ("runtime", "pip install onnxruntime"),
        ("corrupt", "cannot load the model"),
        ("disk-full", "disk is full"),
    ],
)
def test_remote_errors(case, message, device, onnx_file, tmp_path, capfd):
    """Each way a device can be unfit: one line, exit 2, no session folder left on the device."""
    artifact = onnx_file
    kw: dict = {}
    if case == "corrupt":
        artifact = tmp_path / "broken.onnx"
        artifact.write_bytes(b"\x08\x07not an onnx model" * 50)
    elif case == "disk-full":
        # The file the copy writes first is the kernel's full device: a real ENOSPC from the device's disk.
        from quantship.fileio import sha256_file

        artifact = tmp_path / "big.onnx"
        artifact.write_bytes(onnx_file.read_bytes() + b"\0" * 10)
        folder = device.base / "artifacts" / sha256_file(artifact)
        folder.mkdir(parents=True)
        (folder / "big.onnx.part").symlink_to("/dev/full")
    kw = {
        "unreachable": {},
        "auth": {"key": "stranger_key"},
        "host-key": {"known_hosts": device.wrong_known_hosts},
        "unknown-host-key": {"known_hosts": tmp_path / "empty_known_hosts"},
        "interpreter": {"python": tmp_path / "no such" / "python3"},
        "numpy": {"python": device.python_bare},
        "runtime": {"python": device.python_numpy_only},
    }.get(case, {})
    args = device.args(**kw)
    if case == "unreachable":
        args[1] = f"ssh://127.0.0.1:{_free_port()}"
    argv = ["bench", "--artifact", str(artifact), "--min-queries", "5", "--min-seconds", "0", "--warmup", "0", "-q"]
    _fails(argv + ["--out", str(tmp_path / "out")] + args, capfd, message)
    assert not device.sessions()
    assert not (tmp_path / "out" / "bench.jsonl").exists()


def test_malformed_url_and_refused_combinations(capfd, tmp_path, onnx_file):
    base = ["bench", "--artifact", str(onnx_file), "--out", str(tmp_path / "o"), "-q"]
    _fails(base + ["--remote", "ssh://-oProxyCommand=x"], capfd, "no valid host name")
    _fails(base + ["--remote", "ssh://127.0.0.1", "--loadgen", "singlestream"], capfd, "--loadgen runs MLPerf")
    _fails(
        ["bench", "--model", "tiny", "--targets", "keras-fp32", "--remote", "ssh://h", "--out", str(tmp_path)],
        capfd,
        "keras-fp32 runs in TensorFlow",
    )


# ------------------------------------------------------------------------------------ killed and dropped runs
def _start_bench(device, artifacts: list[Path], out: Path, seconds: float) -> subprocess.Popen:
    argv = [sys.executable, "-m", "quantship", "bench", "-q", "--out", str(out), "--warmup", "0"]
    for a in artifacts:
        argv += ["--artifact", str(a)]
    argv += ["--min-queries", "5", "--min-seconds", str(seconds), "--batch-sizes", "1", *device.args()]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _runner_started(device, n: int) -> bool:
    return any((s / f"runner-{n}.pid").is_file() for s in device.sessions())


def test_killed_run_is_cleaned_up(device, onnx_file, tmp_path):
    """SIGKILL of the host mid-run: the device folder goes (its keeper sees the host gone, or the next run sweeps
    it), and the next run removes the host-side folder of the killed one."""
    from quantship.remote.host import DeviceSession
    from quantship.remote.transport import LOCAL_PREFIX

    proc = _start_bench(device, [onnx_file], tmp_path / "out", 60)
    try:
        _wait_for(lambda: _runner_started(device, 2), "the device runner")
    finally:
        proc.kill()
        proc.wait()
    with DeviceSession(device.options()) as session:
        others = [s for s in device.sessions() if str(s) != session.folder]
        assert not others, others
    from quantship.remote.transport import local_root

    assert not list(Path(local_root()).glob(f"{LOCAL_PREFIX}{proc.pid}-*"))
    assert not device.sessions()


def test_terminated_run_cleans_up_on_its_way_out(device, onnx_file, tmp_path):
    """``kill`` (SIGTERM) mid-run unwinds like Ctrl-C: exit 130, and the device folder is gone when it exits."""
    proc = _start_bench(device, [onnx_file], tmp_path / "out", 60)
    try:
        _wait_for(lambda: _runner_started(device, 2), "the device runner")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert not device.sessions()


def test_dropped_connection_keeps_rows_marked_incomplete(device, evaluated, tmp_path):
    """The connection drops in the middle of the rounds: exit 2, one line; each configuration's rounds so far are
    kept in bench.jsonl, marked incomplete_run."""
    _, _, artifacts = evaluated
    proc = _start_bench(device, [artifacts["tflite-int8"], artifacts["onnx-fp32"]], tmp_path / "out", 60)
    try:
        _wait_for(lambda: _runner_started(device, 3), "the second configuration")
        time.sleep(2.0)  # some rounds
        for pid in device.session_children():
            os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, err
    assert "connection to the device runner was lost" in lines[0] and "marked incomplete_run" in lines[0]
    rows = _rows(tmp_path / "out" / "bench.jsonl")
    assert [r["target"] for r in rows] == [artifacts["tflite-int8"].stem, artifacts["onnx-fp32"].stem]
    assert all(r["incomplete_run"] is True and r["where"] == "remote" for r in rows)
    assert rows[0]["rounds"] >= 1 and rows[0]["latency_ms_p50"] > 0


# ------------------------------------------------------------------------------------------- a hung device runner
# The real device runner, made to hang in one command: what a deadlocked runtime or a build that never ends does.
HANGING_RUNNER = r"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("device_runner", sys.argv[1])
runner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runner)
handle, seen = runner.Server.handle, []
def hang(self, req, tensors):
    if req.get("cmd") == HANG:
        seen.append(1)
        if len(seen) > AFTER:
            sys.stderr.write("stuck in " + HANG + "\n")
            sys.stderr.flush()
            time.sleep(3600)
    return handle(self, req, tensors)
runner.Server.handle = hang
sys.argv = sys.argv[1:]
sys.exit(runner.main())
"""


class HardTimeout(Exception):
    """The guard of a test that would otherwise hang (the bug it is written for)."""


@contextlib.contextmanager
def _hard_timeout(seconds: int):
    """Fail (instead of hanging CI) when the body is still running after ``seconds``."""

    def guard(*_):
        raise HardTimeout(f"still waiting on a hung device runner after {seconds} s")

    old = signal.signal(signal.SIGALRM, guard)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _hanging_python(device, folder: Path, command: str, after: int = 0) -> tuple[Path, Path]:
    """An interpreter for --remote-python that runs the device runner hanging in ``command`` (once each runner
    has answered it ``after`` times); each runner's pid is appended to the returned file."""
    script = folder / "hanging_runner.py"
    script.write_text(f"HANG = {command!r}\nAFTER = {after}\n" + HANGING_RUNNER)
    pids = folder / "runner.pids"
    python = folder / "hanging-python"
    # Called as `python -u runner.py PIDFILE`; exec keeps the pid the runner writes in its pid file.
    python.write_text(f'#!/bin/sh\necho $$ >> "{pids}"\nshift\nexec "{device.python}" -u "{script}" "$@"\n')
    python.chmod(0o755)
    return python, pids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _our_children() -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return [p for p in out if _alive(p)]


def test_hung_runner_ends_with_one_line_within_its_deadline(device, onnx_file, tmp_path, capfd):
    """A device runner that reads 'load' and never answers: within --remote-timeout the run ends with one line
    (device, request, deadline, what to do, the runner's last stderr line), exit 2; the runner is gone on the
    device, its ssh here, the session folder there, and no bench.jsonl is half written. Before deadlines existed
    this hung forever: the alarm turns that into a failure."""
    python, pids = _hanging_python(device, tmp_path, "load")
    argv = ["bench", "--artifact", str(onnx_file), "--min-queries", "5", "--min-seconds", "0", "--warmup", "0"]
    argv += ["-q", "--out", str(tmp_path / "out"), *device.args(python=python), "--remote-timeout", "4"]

    before = set(_our_children())
    with _hard_timeout(90):
        start = time.monotonic()
        line = _fails(argv, capfd, f"{device.url}: the device runner did not answer 'load' within 4 s and was stopped")
        took = time.monotonic() - start
    assert "raise --remote-timeout SECONDS" in line and line.endswith("stuck in load"), line
    assert took < 4 + 20, took
    runners = [int(p) for p in pids.read_text().split()]
    assert len(runners) == 2  # the session's 'hello' probe, then the configuration's runner that hung
    _wait_for(lambda: not any(_alive(p) for p in runners), "the hung runner to be gone on the device", 10)
    assert set(_our_children()) <= before, "an ssh client of the hung runner is still running here"
    assert not device.sessions()
    assert not (tmp_path / "out" / "bench.jsonl").exists()


def test_timeout_message_names_what_to_do(device, onnx_file, tmp_path):
    """The error a hung 'infer' raises through the library: RemoteTimeout (a RemoteConnectionLost, so bench keeps
    its rows), naming the option and the runner's last words."""
    from quantship.errors import RemoteConnectionLost, RemoteTimeout
    from quantship.remote.host import DeviceSession, RemoteRunner
    from quantship.runtime.base import RunnerOptions

    python, _ = _hanging_python(device, tmp_path, "infer")
    options = dataclasses.replace(device.options(), python=str(python), timeout=3.0)
    with DeviceSession(options) as session:
        runner = RemoteRunner(session, onnx_file, "onnx", RunnerOptions(threads=1), "onnx-fp32")
        with _hard_timeout(60), runner, pytest.raises(RemoteTimeout) as caught:
            runner.infer(np.zeros((1, 32, 32, 3), np.float32))
        message = str(caught.value)
    assert isinstance(caught.value, RemoteConnectionLost)
    assert "'infer' within 4 s" in message  # 3 s fixed + 1 sample x 1 s
    assert "--remote-timeout SECONDS" in message and message.endswith("stuck in infer")
    assert not device.sessions()


def test_hung_round_keeps_the_rounds_done(device, evaluated, tmp_path, capfd):
    """A runner that stops answering after two rounds: the round's deadline (fixed part + its queries' allowance)
    passes, and the rounds done so far are kept in bench.jsonl, marked incomplete_run, as for a dropped
    connection."""
    _, _, artifacts = evaluated
    python, _ = _hanging_python(device, tmp_path, "round", after=2)
    argv = ["bench", "--artifact", str(artifacts["tflite-int8"]), "--artifact", str(artifacts["onnx-fp32"])]
    argv += ["--min-queries", "5", "--min-seconds", "60", "--max-seconds", "90", "--warmup", "0", "-q"]
    argv += ["--queries-per-round", "2", "--out", str(tmp_path / "out"), *device.args(python=python)]
    with _hard_timeout(90):
        line = _fails(argv + ["--remote-timeout", "3"], capfd, "did not answer 'round' within 5 s and was stopped")
    assert "stuck in round" in line and "2 row(s) measured so far" in line and "marked incomplete_run" in line
    rows = _rows(tmp_path / "out" / "bench.jsonl")
    assert [(r["incomplete_run"], r["where"]) for r in rows] == [(True, "remote")] * 2
    assert [r["rounds"] for r in rows] == [2, 2] and all(r["latency_ms_p50"] > 0 for r in rows)
    assert not device.sessions()


def test_interrupted_while_the_runner_hangs_kills_it(device, onnx_file, tmp_path):
    """``kill`` (SIGTERM, as Ctrl-C) while the device runner hangs in 'load' (its deadline far off): exit 130, and
    the runner, which would never read the goodbye, is killed on the device, not left behind."""
    python, pids = _hanging_python(device, tmp_path, "load")
    argv = [sys.executable, "-m", "quantship", "bench", "-q", "--out", str(tmp_path / "out")]
    argv += ["--artifact", str(onnx_file), "--min-queries", "5", *device.args(python=python)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: pids.is_file() and len(pids.read_text().split()) == 2, "the runner that hangs")
        time.sleep(0.5)  # in its 'load'
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert not [p for p in map(int, pids.read_text().split()) if _alive(p)]
    assert not device.sessions()


def test_request_deadlines():
    """Deadlines fit the request: an engine build gets an hour, a round grows with its queries and with the
    slowest query seen, --remote-timeout replaces the fixed part only."""
    from quantship.remote.host import request_deadline

    assert request_deadline("build_engine", {}) == 3600
    assert request_deadline("load", {}) == 600
    assert request_deadline("round", {"queries": 20}) == 120 + 20
    assert request_deadline("round", {"queries": 20, "batch": 2}, slowest=0.5) == 120 + 20 * 2 * 5
    assert request_deadline("infer", {}, samples=32, fixed=10) == 10 + 32
    assert request_deadline("load", {}, fixed=7200) == 7200
    assert request_deadline("build_engine", {"batch": [1, 8, 32]}, slowest=2.0) == 3600
    finish = {"other_batches": [4], "min_iters": 200, "min_seconds": 5, "warmup_seconds": 1}
    assert request_deadline("bench_finish", finish) == 600 + 6 + 201 * 4


# ------------------------------------------------------------------------------------------- TensorRT on a device
def test_convert_remote_trt_needs_tensorrt_on_the_device(device, trained_tiny, tmp_path, capfd):
    """convert --remote of a trt-* target asks the device's TensorRT (none here): one line, exit 2, before any
    export."""
    _, model = trained_tiny
    argv = ["convert", "--model", str(model), "--preprocess", TINY_PREPROCESS, "--targets", "trt-fp16"]
    _fails(argv + ["--out", str(tmp_path / "out"), "-q", *device.args()], capfd, "no TensorRT on the device")
    assert not list((tmp_path / "out").rglob("*.onnx"))


def test_remote_engine_build_plan_goes_to_the_device(device, trained_tiny, synset_dataset, tmp_path):
    """With the device saying it has TensorRT 10 and a GPU (this one has neither: TensorRT cannot run here), the
    host makes the ONNX file and the calibration cache from its own images, copies both (not the images) and asks
    the device to build; the device runner's own import of TensorRT then refuses, naming what to install."""
    from quantship.config import CalibrationSpec
    from quantship.errors import RemoteError
    from quantship.jobs.convert import ConvertSpec, convert_artifacts
    from quantship.remote.host import DeviceSession

    _, model = trained_tiny
    with DeviceSession(device.options()) as session:
        session.environment.update(tensorrt="10.3.0", gpu="Orin (nvgpu)", compute_capability="8.7")
        with pytest.raises(RemoteError, match="TensorRT on the device"):
            spec = ConvertSpec(
                str(model),
                "trt-int8-entropy",
                tmp_path,
                data=f"imagenet:{synset_dataset}",
                calibration=CalibrationSpec(num_images=8),
                preprocess_overrides={"mode": "tf", "size": 32, "crop_pct": 1.0},
            )
            convert_artifacts(spec, session=session)
        copied = {Path(p).suffix for p in session.uploaded}
    assert copied == {".onnx", ".cache"}
    (cache,) = tmp_path.rglob("*.cache")
    assert b"TRT-" in cache.read_bytes()[:40]
    assert not list(tmp_path.rglob("*.engine"))


def test_signoff_plan_remote(device, trained_tiny, synset_dataset, tmp_path):
    """A plan with ``remote:`` runs its artifacts on the device and its reference here; the units say where."""
    import yaml

    _, model = trained_tiny
    plan = {
        "name": "remote",
        "dataset": f"imagenet:{synset_dataset}",
        "limit": 12,
        "calibration": {"num_images": 8},
        "models": [{"name": str(model), "preprocess": TINY_PREPROCESS}],
        "targets": ["onnx-fp32"],
        "gates": [{"metric": "top1", "relative": 0.9}],
        "bench": {"max_seconds": 1, "min_rounds": 2},
        "remote": {
            "url": device.url,
            "python": str(device.python),
            "ssh_key": str(device.root / "user_key"),
            "ssh_options": [f"UserKnownHostsFile={device.known_hosts}"],
        },
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    assert _main(["signoff", str(path), "--out", str(tmp_path / "out"), "-q"]) == 0
    rows = {r["target"]: r for r in _rows(tmp_path / "out" / "signoff.jsonl")}
    assert rows["keras-fp32"]["where"] == "local" and "remote" not in rows["keras-fp32"]
    assert rows["onnx-fp32"]["where"] == "remote" and rows["onnx-fp32"]["remote"]["url"] == device.url
    assert rows["onnx-fp32"]["top1"] == rows["keras-fp32"]["top1"]
    timed = _rows(tmp_path / "out" / "bench.jsonl")  # the report's latency: measured on the device too
    assert [(r["target"], r["where"]) for r in timed] == [("onnx-fp32", "remote")]
    assert not device.sessions()
