"""The Ray cluster a sign-off runs on: a cluster given by address, or a single-machine instance that quantship
starts itself and that talks to nothing but loopback; and the cleanup of what a killed driver's instance left.

Measured with Ray 2.60.0 (the pinned version), and the reason for each setting here:

- A default local instance listens on every interface, and a helper process (``dashboard.py``, started even with
  the dashboard off) asks the cloud metadata endpoints (169.254.169.254, ``metadata.google.internal``) which
  cloud it runs on, whatever ``RAY_USAGE_STATS_ENABLED`` says. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (clusters
  off: a single-machine instance) makes the node address 127.0.0.1, and then every server binds 127.0.0.1
  (``ray.init(_node_ip_address="127.0.0.1")`` alone does not: Ray turns it back into the routable address). The
  metadata requests go through ``requests``, which honours a proxy: ``http_proxy=http://127.0.0.1:9`` with
  ``no_proxy`` for loopback sends them to a closed loopback port while Ray's own gRPC traffic (which honours
  ``no_proxy``) is untouched. Ray has no switch of its own for either, so the tests check the listening sockets
  of the instance's processes.
- The switch is read when ``ray`` is imported (a module constant), and the token-authentication mode when Ray's
  configuration is first initialised: the environment is set before the first ``import ray``, and re-applied
  through Ray's own hooks when it was imported earlier.
- Token authentication is on by default and writes ``~/.ray/auth_token``; a fresh token passed in the
  environment (``RAY_AUTH_TOKEN``) protects the instance and writes nothing to the home folder.
- Ray's files go to a short private folder on local disk: its Unix sockets fail on network filesystems and on
  paths over 107 bytes (the session folder adds up to 64 characters to the temporary folder).
- The object store would take 0.9 to 7.1 GB depending on free memory; tasks exchange only listings and small
  records, so it is set explicitly.
- The driver prints Ray's notices about its workers ("(raylet) A worker died ...", retries) to stdout from its
  own threads, whatever ``log_to_driver`` says; while a run uses Ray they go to stderr, so stdout carries
  quantship's output only.
- A SIGKILLed driver takes most of its instance with it, but two agent processes live on for about a minute
  (until their parent check times out). Every process of an instance keeps files open under its temporary
  folder, which identifies them; the folder is recorded in the output folder, so the next run on it kills
  them. ``ray stop`` is never used: it kills every Ray process of the machine, other users' included.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from quantship.errors import ConfigError, ExecutorError
from quantship.fileio import write_json_atomic
from quantship.lazy import lazy_import

log = logging.getLogger("quantship")

STATE_FILE = ".ray-local-instance.json"  # in the output folder: where the running local instance keeps its files
ROOT_PREFIX = "quantship-ray-"
MAX_TEMP_DIR = 43  # Ray's socket paths add up to 64 characters; AF_UNIX paths end at 107 bytes
OBJECT_STORE_BYTES = 256 * 2**20  # Ray's minimum is 75 MiB
CONNECT_TIMEOUT_S = 5.0
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    """Ray colours the task name in its exception texts whatever the terminal; error lines carry no codes."""
    return _ANSI.sub("", text)


def import_ray() -> Any:
    return lazy_import("ray", pip_name="'quantship[ray]'", purpose="the Ray executor")


def loopback_env(token: str) -> dict[str, str]:
    """The environment of a loopback-only local instance (its processes inherit it when they start)."""
    proxy = "http://127.0.0.1:9"  # a closed loopback port: the cloud-metadata probe goes nowhere
    loopback = "127.0.0.1,localhost,::1"
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_COLOR_PREFIX": "0",
        **{k: proxy for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")},
        **{k: loopback for k in ("no_proxy", "NO_PROXY")},
    }


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` of a cluster's head (what ``ray start --head`` prints).

    Raises:
        ConfigError: Anything else (Ray Client ``ray://`` addresses included).
    """
    text = address.strip()
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if "://" in text or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--ray-address '{address}': give the head node's address as HOST:PORT (what `ray start --head` prints, "
            "port 6379 by default)"
        )
    return host, int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast (seconds, not Ray's minute of retries) when nothing answers at ``address``.

    Raises:
        ExecutorError: The head node does not accept connections.
    """
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ExecutorError(
            f"cannot reach the Ray cluster at {host}:{port} ({reason.lower()}): start it with `ray start --head` on "
            "the head node, or fix --ray-address"
        ) from None


# ------------------------------------------------------------------------------------- processes of an instance


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def processes_using(folder: str | os.PathLike, candidates: list[Any] | None = None) -> list[Any]:
    """The processes (of this user) with a file open, or an argument, under ``folder``: every process of a Ray
    instance, its agents included once the driver is gone (their environment and command line are rewritten)."""
    folder = os.path.realpath(folder)
    me = os.getpid()
    found = []
    procs = candidates if candidates is not None else psutil.process_iter()
    for p in procs:
        try:
            if p.pid == me or p.uids().real != os.getuid():
                continue
            if any(folder in a for a in p.cmdline()) or any(f.path.startswith(folder + os.sep) for f in p.open_files()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def kill_processes_using(folder: str | os.PathLike, candidates: list[Any] | None = None) -> list[int]:
    """SIGKILL the processes using ``folder``; returns their ids."""
    procs = processes_using(folder, candidates)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=5)
    return [p.pid for p in procs]


def _owned_root(root: str | None) -> bool:
    """Only a folder quantship made for an instance is ever removed (the state file is plain JSON on disk)."""
    return bool(root) and Path(root).is_absolute() and Path(root).name.startswith(ROOT_PREFIX)


def clean_stale_instance(folder: str | os.PathLike) -> list[int]:
    """Kill what the local instance of a killed run on ``folder`` left running, remove its files; returns the
    process ids killed. Call it while holding the folder's lock (then the run that wrote the record is over)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return []
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        state = {}
    root = state.get("root")
    killed: list[int] = []
    if _owned_root(root) and state.get("temp_dir") == os.path.join(root, "r"):
        pid = state.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and psutil.pid_exists(pid):
            log.warning("%s: the Ray instance of process %s is still running; leaving it", path, pid)
            return []
        killed = kill_processes_using(state["temp_dir"])
        shutil.rmtree(root, ignore_errors=True)
        if killed:
            log.warning("killed %d process(es) left by the Ray instance of an interrupted run", len(killed))
    path.unlink(missing_ok=True)
    return killed


# ------------------------------------------------------------------------------------------------ the cluster


class _RayPrintsToStderr:
    """``sys.stdout`` while a run uses Ray: what Ray's driver threads (``ray_listen_error_messages``,
    ``ray_print_logs``) print goes to stderr, everything else to stdout as before."""

    def __init__(self, out: Any, err: Any):
        self.out, self.err = out, err

    def write(self, text: str) -> int:
        return (self.err if threading.current_thread().name.startswith("ray_") else self.out).write(text)

    def flush(self) -> None:
        self.out.flush()
        self.err.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.out, name)


class RayCluster:
    """A connection to Ray for the length of a run (a context manager).

    Args:
        address: ``HOST:PORT`` of a running cluster's head; None starts a local instance on this machine (unless
            this process is connected already: then that connection is used and left open).
        state_dir: Where a local instance records its temporary folder (the output folder), so that the next run
            cleans up after a killed driver.
        num_cpus: CPUs of a local instance (default: the CPUs this process may use).
        num_gpus: GPUs of a local instance (default: Ray detects them).
        ray_prints_to_stderr: Send what Ray's driver threads print to stderr while this object is started.
    """

    def __init__(
        self,
        address: str | None = None,
        state_dir: str | os.PathLike | None = None,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        object_store_bytes: int = OBJECT_STORE_BYTES,
        ray_prints_to_stderr: bool = True,
    ):
        self.address = address
        self.state_dir = Path(state_dir) if state_dir else None
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.object_store_bytes = object_store_bytes
        self.ray_prints_to_stderr = ray_prints_to_stderr
        self.kind = ""  # "local instance", "cluster", "existing connection"
        self.root: str | None = None
        self.temp_dir: str | None = None
        self._owned = False
        self._saved_env: dict[str, str | None] = {}
        self._saved_stdout: Any = None
        self.ray: Any = None

    def __enter__(self) -> "RayCluster":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> "RayCluster":
        if self.ray_prints_to_stderr:
            self._saved_stdout, sys.stdout = sys.stdout, _RayPrintsToStderr(sys.stdout, sys.stderr)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self.address:
            check_reachable(self.address)
        ray = sys.modules.get("ray")
        if ray is not None and getattr(ray, "is_initialized", lambda: False)():
            current = ray.get_runtime_context().gcs_address
            if self.address and parse_address(current) != parse_address(self.address):
                raise ExecutorError(f"this process is connected to the Ray cluster at {current}, not {self.address}")
            self.ray, self.kind = ray, "existing connection"
        elif self.address:
            self.ray = import_ray()
            self._init(address=self.address)
            self.kind = "cluster"
        else:
            self._start_local()

    def _init(self, **kwargs: Any) -> None:
        try:
            self.ray.init(log_to_driver=False, configure_logging=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError...
            lines = [ln for ln in strip_ansi(str(exc)).splitlines() if ln.strip()]
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
            raise ExecutorError(
                f"connecting to {where} failed: {type(exc).__name__}: {lines[0] if lines else ''}"
            ) from None
        self._owned = True

    def _start_local(self) -> None:
        imported = "ray" in sys.modules
        base = "/tmp" if os.access("/tmp", os.W_OK) else tempfile.gettempdir()
        self.root = tempfile.mkdtemp(prefix=ROOT_PREFIX, dir=base)  # mode 0700; Ray's own folders are 0777
        self.temp_dir = os.path.join(self.root, "r")
        self.kind = "local instance"
        if len(self.temp_dir) > MAX_TEMP_DIR:
            raise ExecutorError(
                f"Ray's temporary folder {self.temp_dir} is longer than {MAX_TEMP_DIR} characters (its socket "
                "paths would exceed 107 bytes): set TMPDIR to a short local folder"
            )
        if self.state_dir is not None:
            write_json_atomic(
                self.state_dir / STATE_FILE,
                {"pid": os.getpid(), "root": self.root, "temp_dir": self.temp_dir, "started": time.time()},
            )
        env = loopback_env(secrets.token_hex(32))
        self._saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        self.ray = import_ray()
        if imported:
            _reapply_environment()
        self._init(
            address="local",
            num_cpus=self.num_cpus or len(os.sched_getaffinity(0)),
            num_gpus=self.num_gpus,
            include_dashboard=False,
            object_store_memory=self.object_store_bytes,
            _temp_dir=self.temp_dir,
        )
        if self.ray.util.get_node_ip_address() != "127.0.0.1":
            raise ExecutorError("the local Ray instance did not come up on loopback only; not using it")

    def stop(self) -> None:
        """Shut down what this object started (a connection opened before is left open) and remove its files."""
        if self._owned and self.ray is not None and self.ray.is_initialized():
            with contextlib.suppress(Exception):
                self.ray.shutdown()
        self._owned = False
        if self.temp_dir is not None:
            kill_processes_using(self.temp_dir, psutil.Process().children(recursive=True))
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            if self.state_dir is not None:
                (self.state_dir / STATE_FILE).unlink(missing_ok=True)
        self.root = self.temp_dir = None
        if self._saved_stdout is not None:
            sys.stdout, self._saved_stdout = self._saved_stdout, None

    # ---------------------------------------------------------------------------------------------- facts

    def nodes(self) -> list[dict[str, Any]]:
        """The live nodes that can run tasks: id, address, host name, CPUs, GPUs and their model (as Ray names it)."""
        out = []
        for n in self.ray.nodes():
            res = n.get("Resources", {})
            if n.get("Alive") and res.get("CPU", 0) > 0:
                out.append(
                    {
                        "node_id": n["NodeID"],
                        "ip": n.get("NodeManagerAddress"),
                        "host": n.get("NodeManagerHostname"),
                        "cpus": int(res.get("CPU", 0)),
                        "gpus": int(res.get("GPU", 0)),
                        "gpu_type": next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), None),
                    }
                )
        return out

    def describe(self) -> str:
        if self.kind == "local instance":
            return "a local Ray instance (loopback only)"
        if self.kind == "cluster":
            return f"the Ray cluster at {self.address}"
        return "the Ray cluster this process is connected to"

    def listening_sockets(self) -> list[dict[str, Any]]:
        """Every listening TCP socket of this process and its descendants (a local instance's processes), with
        whether it is bound to loopback."""
        out = []
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                name = p.name()
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        out.append(
                            {"pid": p.pid, "name": name, "ip": c.laddr.ip, "port": c.laddr.port,
                             "loopback": _is_loopback(c.laddr.ip)}
                        )  # fmt: skip
            except psutil.Error:
                continue
        return out


def _reapply_environment() -> None:
    """Ray was imported before the loopback environment was set: make it read the environment again (what Ray's
    own token setup does), and turn off the cluster switch it computed at import."""
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    ray_constants.ENABLE_RAY_CLUSTER = False
