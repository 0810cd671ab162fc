"""What measuring over SSH costs (issue 22), on loopback: the device is this machine, reached through a throwaway
OpenSSH server on 127.0.0.1 (key-only, host key pinned), the device runner started by ``python`` there.

(a) bench: the same file (.tflite, or .onnx with --artifact) timed locally and on the "device", interleaved in one
    run (the same rounds, order rotated, the local configuration the reference): the remote/local latency ratio
    with its 95 % interval. The device runner times the same call on the device's clock, so the ratio should be 1
    within +-5 %.
(b) eval: the per-query cost of ``eval --remote`` against a local eval: host round trip of one batch (feed sent,
    outputs back) against the local runner's query, alternating, for a float model (the largest feed).

    python benchmarks/remote_overhead.py                  # MobileNetV2 (random weights) 224x224, 60 s of rounds
    python benchmarks/remote_overhead.py --smoke          # the tiny model of smoke.py, short rounds, few batches
    python benchmarks/remote_overhead.py --artifact m.tflite --work /tmp/ro

Needs sshd (Debian: apt-get install -y openssh-server) and root, or an sshd the user may start. The load average
is printed with the figures.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sshd(root: Path) -> tuple[subprocess.Popen, dict]:
    """A key-only sshd on 127.0.0.1 with throwaway keys; returns it and the RemoteOptions fields to reach it."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).is_file():
        raise SystemExit("no sshd: apt-get install -y openssh-server")
    os.makedirs("/run/sshd", exist_ok=True)
    port = free_port()
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    home = root / "home"
    home.mkdir()
    pub = (root / "user_key.pub").read_text().strip()
    (root / "authorized_keys").write_text(f'environment="HOME={home}" {pub}\n')
    host = " ".join((root / "host_key.pub").read_text().split()[:2])
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {host}\n")
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPasswordAuthentication no\nUsePAM no\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nPermitUserEnvironment yes\nLogLevel ERROR\n"
    )
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(root / "sshd_config")], stderr=subprocess.DEVNULL)
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    return proc, dict(
        url=f"ssh://{getpass.getuser()}@127.0.0.1:{port}",
        python=sys.executable,
        ssh_key=root / "user_key",
        ssh_options=(f"UserKnownHostsFile={root / 'known_hosts'}",),
    )


def build(work: Path, smoke: bool = False) -> str:
    """MobileNetV2 (random weights; with ``smoke`` the tiny model of benchmarks/smoke.py) as tflite-fp32, converted
    by ``quantship convert`` in its own process: this process then holds no TensorFlow while it times (with
    TensorFlow loaded here, the local worker it starts ran at half the speed of the device runner in one run on
    the shared machine)."""
    out = work / "artifacts"
    model = ["--model", "mobilenet_v2", "--weights", "random"]
    if smoke:
        from smoke import PREPROCESS, tiny_model

        model = ["--model", tiny_model(work), "--preprocess", PREPROCESS]
    cmd = [sys.executable, "-m", "quantship", "convert", *model]
    subprocess.run(cmd + ["--targets", "tflite-fp32", "--out", str(out), "-q"], check=True, capture_output=True)
    return str(next(out.rglob("*tflite-fp32.tflite")))


def interleaved(session, artifact: str, threads: int, args) -> list[dict]:
    """(a): local and remote workers of the same file in one interleaved run."""
    from quantship.evaluate.bench import BenchConfig, LocalBenchWorker
    from quantship.evaluate.interleave import InterleaveOptions, run_interleaved
    from quantship.evaluate.stability import StopRule
    from quantship.remote.bench import RemoteBenchWorker

    common = dict(threads=threads, warmup_seconds=1.0, min_queries=args.min_queries, min_seconds=args.min_seconds)
    workers = [
        LocalBenchWorker(BenchConfig(artifact, target="local", **common)),
        RemoteBenchWorker(session, BenchConfig(artifact, target="remote", **common)),
    ]
    options = InterleaveOptions(
        stop=StopRule(ratio_precision=0.02, min_rounds=args.min_rounds, max_seconds=args.max_seconds),
        queries_per_round=20,
        min_queries=args.min_queries,
        min_seconds=args.min_seconds,
        reference="local",
    )
    try:
        return run_interleaved(workers, options).rows
    finally:
        for w in workers:
            w.close()


def eval_cost(session, artifact: str, threads: int, batches: int, batch: int = 8) -> dict:
    """(b): host wall time of one eval batch, local runner vs the device runner through the session."""
    from quantship.remote.host import RemoteRunner
    from quantship.runtime.base import RunnerOptions
    from quantship.runtime.registry import make_runner, runtime_for_artifact

    options = RunnerOptions(threads=threads)
    local = make_runner(artifact, options).activate()
    remote = RemoteRunner(session, artifact, runtime_for_artifact(artifact).name, options, "remote").activate()
    meta = local.input_metadata()[0]
    x = np.random.default_rng(0).uniform(-1, 1, (batch, *meta.shape[1:])).astype(np.float32)
    here, there, device = [], [], []
    for i in range(batches + 2):
        t = time.perf_counter()
        local.infer(x)
        a = time.perf_counter() - t
        remote.infer(x)
        if i >= 2:  # warm-up
            here.append(a * 1e3)
            there.append(remote.last_round_trip_time * 1e3)
            device.append(remote.last_query_time * 1e3)
    sent = remote.process.bytes_sent / remote.process.requests
    local.deactivate()
    remote.deactivate()
    med = {
        k: float(np.median(v)) for k, v in (("local", here), ("remote_round_trip", there), ("remote_device", device))
    }
    return {
        "batch": batch,
        "batches": batches,
        "feed_mb": float(x.nbytes / 1e6),
        "bytes_per_request": sent,
        "local_ms_p50": med["local"],
        "remote_round_trip_ms_p50": med["remote_round_trip"],
        "remote_device_query_ms_p50": med["remote_device"],
        "added_ms_per_batch": med["remote_round_trip"] - med["remote_device"],
        "added_ms_per_image": (med["remote_round_trip"] - med["remote_device"]) / batch,
        "round_trip_over_local": med["remote_round_trip"] / med["local"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", help="a .tflite or .onnx file (default: MobileNetV2 tflite-fp32, random weights)")
    p.add_argument("--work", help="working folder (default: a temporary one)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()
    args.min_rounds, args.max_seconds = (5, 4.0) if args.smoke else (20, 60.0)
    args.min_queries, args.min_seconds = (20, 0.5) if args.smoke else (400, 10.0)
    batches = 10 if args.smoke else 50

    from quantship.config import RemoteOptions
    from quantship.remote.host import DeviceSession

    work = Path(args.work or tempfile.mkdtemp(prefix="remote-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    artifact = args.artifact or build(work, args.smoke)
    root = Path(tempfile.mkdtemp(prefix="sshd-"))
    sshd, fields = start_sshd(root)
    load_before = os.getloadavg()[0]
    try:
        with DeviceSession(RemoteOptions(**fields)) as session:
            rows = interleaved(session, artifact, args.threads, args)
            cost = eval_cost(session, artifact, args.threads, batches)
    finally:
        sshd.terminate()
        sshd.wait()
        shutil.rmtree(root, ignore_errors=True)
    remote = next(r for r in rows if r["target"] == "remote")
    local = next(r for r in rows if r["target"] == "local")
    out = {
        "artifact": Path(artifact).name,
        "threads": args.threads,
        "load_average": [load_before, os.getloadavg()[0]],
        "cpu_mhz": local.get("cpu_mhz_before"),
        "rounds": remote["rounds"],
        "local_p50_ms": local["latency_ms_p50"],
        "remote_p50_ms": remote["latency_ms_p50"],
        "remote_over_local": remote.get("ratio_to_reference"),
        "interval": [remote.get("ratio_ci_low"), remote.get("ratio_ci_high")],
        "within_5_percent": bool(
            remote.get("ratio_ci_low") is not None
            and remote["ratio_ci_low"] >= 0.95
            and remote["ratio_ci_high"] <= 1.05
        ),
        "eval": cost,
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
