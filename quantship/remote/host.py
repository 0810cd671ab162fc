"""The host side of a remote run: open a session on the device, sweep what killed runs left there, copy the
device runner and the artifacts, drive runners, and remove the session's folder on exit, Ctrl-C and SIGTERM.

On the device, under ``$QUANTSHIP_REMOTE_DIR`` (default ``~/.cache/quantship-remote``, mode 700):

* ``artifacts/<sha256>/<file name>``: artifacts kept between runs under their content hash (``--remote-no-cache``:
  copied into the session folder instead, and removed with it);
* ``run-<host>-<pid>-XXXXXXXX/``: one session's folder (mode 700): the runner file, a ``pid`` file naming the
  process that keeps the session (it removes the folder when the host goes away), one pid file per runner.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from quantship.config import RemoteOptions
from quantship.errors import RemoteConnectionLost, RemoteError, RuntimeBackendError
from quantship.fileio import sha256_file
from quantship.manifest import manifest_path
from quantship.remote.transport import Transport, classify, make_transport, stop
from quantship.runtime.base import Runner, RunnerOptions, TensorMeta

log = logging.getLogger("quantship.remote")
RUNNER_FILE = Path(__file__).with_name("device_runner.py")

# Kept alive for the whole session: sweeps folders of sessions whose keeper is gone, makes this session's folder,
# says where it is, then waits for the host to close its stdin (or for the connection to drop) and removes it.
KEEPER_SCRIPT = r"""
umask 077
base="${QUANTSHIP_REMOTE_DIR:-$HOME/.cache/quantship-remote}"
mkdir -p "$base/artifacts" || exit 3
chmod 700 "$base" || exit 3
swept=0
for d in "$base"/run-*; do
  [ -d "$d" ] || continue
  if [ -f "$d/pid" ]; then
    kill -0 "$(cat "$d/pid")" 2>/dev/null && continue
  elif [ -z "$(find "$d" -maxdepth 0 -mmin +1 2>/dev/null)" ]; then
    continue
  fi
  rm -rf "$d" && swept=$((swept+1))
done
dir=$(mktemp -d "$base/run-$1-XXXXXXXX") || exit 4
echo $$ > "$dir/pid" || exit 4
printf '%s\t%s\t%s\n' "$swept" "$base" "$dir"
cat > /dev/null
rm -rf "$dir"
"""
# Exit codes of a shell that could not start the interpreter.
NO_INTERPRETER = (126, 127)


def _tag() -> str:
    host = re.sub(r"[^A-Za-z0-9]+", "-", socket.gethostname())[:24].strip("-") or "host"

    return f"{host}-{os.getpid()}"


class DeviceSession:
    """One connection to a device and one private folder on it, for the length of a run.

    Use as a context manager: on leaving (normally, on an error, on Ctrl-C, or on SIGTERM, which the CLI turns
    into the same unwinding) every runner is stopped, the folder removed and the connection closed.

    Attributes:
        environment: The device's environment (``hello``): CPU, flags, libraries, Python, governor, GPU.
        uploaded: Local artifact files copied during this session (a cached one is not copied again).
        swept: Folders of killed runs removed when the session opened.
    """

    def __init__(self, options: RemoteOptions):
        self.options = options
        self.transport: Transport = make_transport(options)  # a malformed URL is refused here, before any work
        self.environment: dict[str, Any] = {}
        self.uploaded: list[str] = []
        self.swept = 0
        self._keeper: subprocess.Popen | None = None
        self._processes: list[DeviceProcess] = []
        self._placed: dict[str, tuple[str, bool]] = {}
        self.base = self.folder = ""
        self._count = 0

    @property
    def url(self) -> str:
        return self.transport.url.public()

    # -- lifecycle ----------------------------------------------------------------------------------
    def __enter__(self) -> "DeviceSession":
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self) -> "DeviceSession":
        """Connect, make the session folder (sweeping stale ones), copy the runner and read the environment.

        Raises:
            RemoteError: Unreachable, authentication or host key refused, no such interpreter, numpy missing,
                the device's disk full.
        """
        self.transport.open()
        err = self._local("keeper.err")
        self._keeper = self.transport.popen(["sh", "-c", KEEPER_SCRIPT, "sh", _tag()], err)
        line = self._keeper.stdout.readline().decode(errors="replace").rstrip("\n")
        parts = line.split("\t")
        if len(parts) != 3:
            self._keeper.wait(10)
            text = err.read_text(errors="replace")
            raise classify(self.transport.url, text, "making the session folder on the device")
        self.swept, self.base, self.folder = int(parts[0]), parts[1], parts[2]
        self.transport.upload(RUNNER_FILE, f"{self.folder}/runner.py")
        probe = self.process()
        try:
            self.environment = probe.request("hello")[0]["environment"]
        finally:
            probe.close()
        return self

    def close(self) -> None:
        """Stop every runner, remove the session folder (the keeper does, when its stdin closes), disconnect."""
        for proc in list(self._processes):
            proc.close()
        if self._keeper is not None:
            stop(self._keeper, grace=5.0)
            self._keeper = None
        self.transport.close()

    def _local(self, name: str) -> Path:
        folder = getattr(self.transport, "local_dir", None)
        if folder is None:
            raise RemoteError(f"{self.url}: the session is closed")
        return Path(folder) / name

    # -- files --------------------------------------------------------------------------------------
    def put(self, local: str | Path) -> tuple[str, bool]:
        """The device path of ``local`` (its manifest, when it has one, goes beside it); copied unless the
        device already holds the same bytes (by SHA-256) in its cache. Returns (path, whether it was copied)."""
        local = Path(local)
        key = str(local.resolve())
        if key in self._placed:
            return self._placed[key]
        digest = sha256_file(local)
        root = f"{self.base}/artifacts" if self.options.cache else f"{self.folder}/artifacts"
        folder = f"{root}/{digest}"
        remote = f"{folder}/{local.name}"
        # One round trip: the cached file is there, or its folder is made for the copy.
        have = self.transport.run(
            ["sh", "-c", 'test -s "$1" && echo cached || mkdir -p -m 700 "$2"', "sh", remote, folder], timeout=60
        )
        copied = b"cached" not in have.stdout
        if copied:
            if have.returncode != 0:
                raise classify(self.transport.url, have.stderr.decode(errors="replace"), f"storing {local.name}")
            mpath = manifest_path(local)
            if mpath.is_file():
                self.transport.upload(mpath, f"{remote}.json")
            self.transport.upload(local, remote)
            self.uploaded.append(str(local))
        self._placed[key] = (remote, copied)
        return remote, copied

    # -- runners ------------------------------------------------------------------------------------
    def process(self) -> "DeviceProcess":
        """Start one device runner (its own process on the device, over the shared connection)."""
        self._count += 1
        pid_file = f"runner-{self._count}.pid"
        err = self._local(f"runner-{self._count}.err")
        script = 'cd "$1" && exec "$2" -u runner.py "$3"'
        popen = self.transport.popen(["sh", "-c", script, "sh", self.folder, self.options.python, pid_file], err)
        proc = DeviceProcess(self, popen, err)
        self._processes.append(proc)
        return proc

    def fields(self) -> dict[str, Any]:
        """The ``remote`` object of a row: the URL without credentials and the device's environment."""
        env = dict(self.environment)
        env.pop("pid", None)
        env.pop("protocol", None)
        return {"url": self.url, **env}


class DeviceProcess:
    """One runner process on the device: requests and answers (JSON line + binary tensor frames)."""

    def __init__(self, session: DeviceSession, popen: subprocess.Popen, stderr_path: Path):
        self.session = session
        self.popen = popen
        self.stderr_path = stderr_path
        self.requests = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    def request(
        self, cmd: str, tensors: Mapping[str, np.ndarray] | None = None, **fields: Any
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Send one command and read its answer.

        Raises:
            RemoteError: numpy or the runtime missing on the device (the pip package named), its disk full.
            RuntimeBackendError: The device's runtime cannot load or run the model (its reason).
            RemoteConnectionLost: The runner or the connection went away.
        """
        items = [(k, np.ascontiguousarray(v)) for k, v in (tensors or {}).items()]
        header = {
            "cmd": cmd,
            **fields,
            "tensors": [{"name": k, "dtype": v.dtype.name, "shape": list(v.shape)} for k, v in items],
        }
        payload = [json.dumps(header).encode() + b"\n"] + [v.tobytes() for _, v in items]
        try:
            data = b"".join(payload)
            self.popen.stdin.write(data)
            self.popen.stdin.flush()
            self.bytes_sent += len(data)
            line = self.popen.stdout.readline()
            if not line:
                raise self._gone(cmd)
            answer = json.loads(line)
            out = {}
            for t in answer.get("tensors", []):
                dtype = np.dtype(t["dtype"])
                n = int(np.prod(t["shape"], dtype=np.int64)) * dtype.itemsize
                blob = self.popen.stdout.read(n)
                if len(blob) != n:
                    raise self._gone(cmd)
                out[t["name"]] = np.frombuffer(blob, dtype=dtype).reshape(t["shape"])
                self.bytes_received += n
            self.bytes_received += len(line)
        except (BrokenPipeError, ConnectionError, ValueError):
            raise self._gone(cmd) from None
        self.requests += 1
        if not answer.get("ok"):
            raise self._refused(answer)
        return answer, out

    def _refused(self, answer: dict[str, Any]) -> Exception:
        url, kind, text = self.session.url, answer.get("kind"), answer.get("error", "")
        if kind == "missing":
            return RemoteError(f"{url}: {text}")
        if kind == "disk":
            return RemoteError(f"{url}: the device's disk is full ({text}); free space there")
        if kind in ("load", "engine", "input", "build"):
            return RuntimeBackendError(f"on {url}: {text}")
        return RemoteError(f"{url}: the device runner failed: {text}")

    def _gone(self, cmd: str) -> Exception:
        """Why the answer never came: the interpreter does not exist, or the runner/connection went away."""
        try:
            code = self.popen.wait(10)
        except subprocess.TimeoutExpired:
            code = None
        err = self.stderr_path.read_text(errors="replace") if self.stderr_path.is_file() else ""
        url = self.session.url
        if code in NO_INTERPRETER:
            return RemoteError(
                f"{url}: no Python interpreter '{self.session.options.python}' on the device; give its path with "
                "--remote-python (Python >= 3.10 with numpy)"
            )
        if "No space left" in err:
            return RemoteError(f"{url}: the device's disk is full; free space there")
        detail = [ln for ln in err.strip().splitlines() if ln.strip()]
        why = f": {detail[-1][:300]}" if detail else ""
        return RemoteConnectionLost(f"{url}: the connection to the device runner was lost during '{cmd}'{why}")

    def close(self) -> None:
        if self.popen.poll() is None:
            try:
                self.popen.stdin.write(b'{"cmd": "bye"}\n')
                self.popen.stdin.flush()
            except OSError:
                pass
        stop(self.popen)
        if self in self.session._processes:
            self.session._processes.remove(self)


def _meta(d: dict[str, Any]) -> TensorMeta:
    return TensorMeta(d["name"], tuple(d["shape"]), np.dtype(d["dtype"]), d.get("scale"), d.get("zero_point"))


class RemoteRunner(Runner):
    """A :class:`Runner` whose artifact runs on the device: the device runner applies the same options (threads,
    execution providers, session configuration) and times the same call as the local runner; feeds go over in
    the dtype given (the model's own integer type with ``raw=True``) and outputs come back as the device made
    them.

    ``last_query_time`` and ``last_inference_time`` are the device's times; ``last_round_trip_time`` is the
    host's wall time of the request.
    """

    def __init__(self, session: DeviceSession, artifact: str | Path, runtime: str, options: RunnerOptions, name: str):
        super().__init__(name)
        self.session = session
        self.artifact = Path(artifact)
        self.runtime = runtime
        self.options = options
        self.process: DeviceProcess | None = None
        self.loaded: dict[str, Any] = {}
        self.copied = False
        self.last_round_trip_time: float | None = None
        self.last_timings: dict[str, float] = {}

    def activate_impl(self) -> None:
        remote, self.copied = self.session.put(self.artifact)
        self.process = self.session.process()
        try:
            self.loaded = self.load(self.process, remote)
        except BaseException:
            self.process.close()
            self.process = None
            raise
        self._inputs = [_meta(d) for d in self.loaded["inputs"]]
        self._outputs = [_meta(d) for d in self.loaded["outputs"]]

    def load(self, process: DeviceProcess, remote: str, cores: tuple[int, ...] | None = None) -> dict[str, Any]:
        return process.request(
            "load",
            path=remote,
            runtime=self.runtime,
            threads=self.options.threads,
            providers=list(self.options.providers),
            session_config=[list(kv) for kv in self.options.session_config],
            manifest=f"{remote}.json",  # read by runtimes that check where an artifact was built (TensorRT)
            cores=list(cores) if cores else None,
        )[0]

    def infer_impl(self, feed: dict[str, np.ndarray], raw: bool) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        answer, out = self.process.request("infer", feed, raw=raw)
        self.last_round_trip_time = time.perf_counter() - start
        self._runtime_seconds = answer["runtime_s"]
        self._device_query = answer["query_s"]
        self.last_timings = answer.get("timings") or {}
        return {m.name: out[m.name] for m in self._outputs}

    def infer(self, feed: Any, raw: bool = False) -> dict[str, np.ndarray]:
        out = super().infer(feed, raw)
        self.last_query_time = self._device_query  # the device's query, as a local runner's is its own
        return out

    def deactivate_impl(self) -> None:
        if self.process is not None:
            self.process.close()
            self.process = None

    def input_metadata_impl(self) -> list[TensorMeta]:
        return self._inputs

    def output_metadata_impl(self) -> list[TensorMeta]:
        return self._outputs

    @property
    def active_providers(self) -> list[str]:
        return list(self.loaded.get("providers") or [])
