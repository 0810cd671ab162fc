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
import select
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from quantship.config import RemoteOptions
from quantship.errors import RemoteConnectionLost, RemoteError, RemoteTimeout, RuntimeBackendError
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

# The fixed part of each request's deadline on the device, in seconds (``--remote-timeout`` replaces them all).
# Generous on purpose: a deadline is there to end a run that would never end, not to judge a slow device. Loading
# a model (a TensorRT engine deserialised, an ONNX Runtime session optimised on a Raspberry Pi) takes minutes;
# building an engine on a Jetson Nano tens of minutes; everything else seconds.
DEADLINES = {
    "hello": 120.0,  # the runner starting: Python and numpy imported from a cold SD card
    "load": 600.0,
    "build_engine": 3600.0,
    "bench_start": 300.0,  # plus its warm-up seconds and queries
    "bench_finish": 600.0,  # plus its timed queries at every other batch size (and a profiled session)
}
DEFAULT_DEADLINE = 120.0  # infer, round, time, conversion, rusage, ... (plus their per-query allowance)
# Each query a request asks for adds max(MIN_QUERY_ALLOWANCE, QUERY_ALLOWANCE_FACTOR x the slowest query this
# runner has answered so far, per sample) to its deadline: a round of many queries, or of a slow model, gets the
# time it needs, and one that stops answering is still caught.
MIN_QUERY_ALLOWANCE = 1.0
QUERY_ALLOWANCE_FACTOR = 10.0
# A runner asked to leave that is still there after this long is stuck in a request: it is killed on the device.
BYE_GRACE = 5.0


def fixed_deadline(cmd: str, fixed: float | None = None) -> float:
    """The fixed part of a request's deadline: ``fixed`` (``--remote-timeout``), else the request kind's default."""
    return DEADLINES.get(cmd, DEFAULT_DEADLINE) if fixed is None else fixed


def request_deadline(
    cmd: str, fields: Mapping[str, Any], samples: int = 1, slowest: float = 0.0, fixed: float | None = None
) -> float:
    """Seconds a request may take before the runner is taken for hung.

    Args:
        cmd: The request (``load``, ``infer``, ``round``, ...).
        fields: Its fields (``queries``, ``batch``, ``warmup_seconds``, ``min_iters``, ...).
        samples: The samples of the tensors sent with it (an ``infer`` batch).
        slowest: The slowest query this runner has answered so far, in seconds per sample (0: none yet).
        fixed: The fixed part (``--remote-timeout``); None: the request's default.

    Returns:
        The fixed part plus the allowance for the queries the request asks for.
    """
    base = fixed_deadline(cmd, fixed)
    per = max(MIN_QUERY_ALLOWANCE, QUERY_ALLOWANCE_FACTOR * slowest)
    batch = fields.get("batch")
    batch = max(1, batch) if isinstance(batch, int) else 1  # build_engine's is a (min, opt, max) profile
    if cmd == "infer":
        return base + samples * per
    if cmd == "round":
        return base + int(fields.get("queries", 1)) * batch * per
    if cmd == "bench_start":  # the first inference, at least 5 warm-up queries, then the warm-up seconds
        return base + float(fields.get("warmup_seconds") or 0) + 6 * batch * per
    if cmd in ("time", "bench_finish"):
        batches = [batch] if cmd == "time" else [max(1, int(b)) for b in fields.get("other_batches", [])]
        queries = int(fields.get("min_iters", 20)) + int(fields.get("warmup_calls", 1))
        seconds = float(fields.get("min_seconds") or 0) + float(fields.get("warmup_seconds") or 0)
        return base + sum(seconds + queries * b * per for b in batches)
    return base


class Deadline:
    """A point on the monotonic clock; :meth:`left` is what remains of it (never negative)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def poll_ms(self) -> int:
        """What remains, as ``poll``'s timeout: whole milliseconds rounded up, at least 1 (0 would not wait)."""
        return max(1, int(self.left() * 1000 + 0.999))


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
        seconds = fixed_deadline("hello", self.options.timeout)
        line = PipeReader(self._keeper.stdout.fileno()).readline(Deadline(seconds))
        if line is None:  # the device's shell never said where the folder is (a hung disk, a hung login)
            self._keeper.kill()
            self._keeper.wait()
            raise self.late("making the session folder", seconds, err, who="the device's shell")
        parts = line.decode(errors="replace").rstrip("\n").split("\t")
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

    def late(
        self, doing: str, seconds: float, stderr_path: Path | None = None, who: str = "the device runner"
    ) -> RemoteTimeout:
        """The one-line error of a request that passed its deadline: the device, the request, the deadline, what
        to do, and the last line the device printed on stderr."""
        err = stderr_path.read_text(errors="replace") if stderr_path is not None and stderr_path.is_file() else ""
        detail = [ln.strip() for ln in err.strip().splitlines() if ln.strip()]
        said = f"; its last words on stderr: {detail[-1][:300]}" if detail else ""
        return RemoteTimeout(
            f"{self.url}: {who} did not answer '{doing}' within {seconds:g} s and was stopped; if the "
            f"device is just slow, raise --remote-timeout SECONDS (a plan: remote: {{timeout: SECONDS}}), else check "
            f"the device (overloaded? the runtime stuck? run the artifact there by hand){said}"
        )

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
            ["sh", "-c", 'test -s "$1" && echo cached || mkdir -p -m 700 "$2"', "sh", remote, folder],
            timeout=fixed_deadline("put", self.options.timeout),
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
        proc = DeviceProcess(self, popen, err, f"{self.folder}/{pid_file}")
        self._processes.append(proc)
        return proc

    def fields(self) -> dict[str, Any]:
        """The ``remote`` object of a row: the URL without credentials and the device's environment."""
        env = dict(self.environment)
        env.pop("pid", None)
        env.pop("protocol", None)
        return {"url": self.url, **env}


class PipeReader:
    """Reads a pipe against a deadline: ``poll`` on its descriptor, then ``os.read`` what is there (no thread, no
    busy wait). What was read past a line or a frame stays in the buffer for the next call."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = bytearray()
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self.eof = False

    def _fill(self, deadline: Deadline) -> bool:
        """Read what the pipe holds into the buffer, waiting at most until ``deadline``; False when it passed.

        Raises:
            EOFError: The other end closed the pipe.
        """
        if self.eof:
            raise EOFError
        if not self._poll.poll(deadline.poll_ms()):
            return deadline.left() > 0  # woken early (a signal): wait again; else the deadline passed
        try:
            chunk = os.read(self.fd, 1 << 20)
        except BlockingIOError:  # poll said readable, nothing was: wait again
            return True
        if not chunk:
            self.eof = True
            raise EOFError
        self.buffer += chunk
        return True

    def readline(self, deadline: Deadline) -> bytes | None:
        """One line (with its newline; what is left when the pipe closes: b"" at once); None when the deadline
        passed first."""
        while (end := self.buffer.find(b"\n")) < 0:
            try:
                if not self._fill(deadline):
                    return None
            except EOFError:
                end = len(self.buffer) - 1
                break
        line = bytes(self.buffer[: end + 1])
        del self.buffer[: end + 1]
        return line

    def read(self, n: int, deadline: Deadline) -> bytes | None:
        """``n`` bytes (fewer when the pipe closes first); None when the deadline passed first."""
        while len(self.buffer) < n:
            try:
                if not self._fill(deadline):
                    return None
            except EOFError:
                break
        blob = bytes(self.buffer[:n])
        del self.buffer[:n]
        return blob


def write_all(fd: int, data: bytes, deadline: Deadline) -> bool:
    """Write ``data`` to a non-blocking pipe, waiting for room at most until ``deadline``; False when it passed
    (a runner that stopped reading leaves a big tensor half sent)."""
    view = memoryview(data)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while view:
        if not poller.poll(deadline.poll_ms()):
            if deadline.left() > 0:
                continue
            return False
        try:
            view = view[os.write(fd, view[: 1 << 20]) :]
        except BlockingIOError:
            continue
    return True


class DeviceProcess:
    """One runner process on the device: requests and answers (JSON line + binary tensor frames), each within its
    deadline (:func:`request_deadline`): past it, the runner is killed on the device and its ssh here, and the
    request raises :class:`RemoteTimeout`."""

    def __init__(self, session: DeviceSession, popen: subprocess.Popen, stderr_path: Path, pid_file: str = ""):
        self.session = session
        self.popen = popen
        self.stderr_path = stderr_path
        self.pid_file = pid_file
        self.requests = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.slowest = 0.0  # the slowest query answered so far, seconds per sample (sizes the next deadlines)
        self._batch = 1  # the bench's latency batch (``bench_start``): a round's queries are of this size
        self._reader = PipeReader(popen.stdout.fileno())
        os.set_blocking(popen.stdin.fileno(), False)  # writes wait in poll, against the deadline

    def deadline(self, cmd: str, fields: Mapping[str, Any], samples: int = 1) -> float:
        """The seconds ``cmd`` may take (:func:`request_deadline` with this runner's slowest query so far)."""
        if cmd == "round":
            fields = {**fields, "batch": self._batch}
        return request_deadline(cmd, fields, samples, self.slowest, self.session.options.timeout)

    def request(
        self, cmd: str, tensors: Mapping[str, np.ndarray] | None = None, **fields: Any
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Send one command and read its answer, both within the command's deadline.

        Raises:
            RemoteError: numpy or the runtime missing on the device (the pip package named), its disk full.
            RuntimeBackendError: The device's runtime cannot load or run the model (its reason).
            RemoteConnectionLost: The runner or the connection went away.
            RemoteTimeout: No answer within the deadline; the runner was stopped (on the device and here).
        """
        items = [(k, np.ascontiguousarray(v)) for k, v in (tensors or {}).items()]
        header = {
            "cmd": cmd,
            **fields,
            "tensors": [{"name": k, "dtype": v.dtype.name, "shape": list(v.shape)} for k, v in items],
        }
        samples = int(items[0][1].shape[0]) if items and items[0][1].ndim else 1
        deadline = Deadline(self.deadline(cmd, fields, samples))
        payload = [json.dumps(header).encode() + b"\n"] + [v.tobytes() for _, v in items]
        try:
            data = b"".join(payload)
            if not write_all(self.popen.stdin.fileno(), data, deadline):
                raise self._late(cmd, deadline)
            self.bytes_sent += len(data)
            line = self._reader.readline(deadline)
            if line is None:
                raise self._late(cmd, deadline)
            if not line:
                raise self._gone(cmd)
            answer = json.loads(line)
            out = {}
            for t in answer.get("tensors", []):
                dtype = np.dtype(t["dtype"])
                n = int(np.prod(t["shape"], dtype=np.int64)) * dtype.itemsize
                blob = self._reader.read(n, deadline)
                if blob is None:
                    raise self._late(cmd, deadline)
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
        self._note(cmd, answer, fields, samples)
        return answer, out

    def _note(self, cmd: str, answer: dict[str, Any], fields: Mapping[str, Any], samples: int) -> None:
        """Keep the slowest query per sample the device reported (the allowance of the next requests)."""
        if cmd == "bench_start":
            self._batch = max(1, int(fields.get("batch") or 1))
            seen = [float(answer.get("first_inference_ms") or 0) / 1e3]
            per = self._batch
        elif cmd == "round":
            seen, per = [float(v) / 1e3 for v in answer.get("query_ms") or ()], self._batch
        elif cmd == "infer":
            seen, per = [float(answer.get("query_s") or 0)], samples
        else:
            return
        if seen:
            self.slowest = max(self.slowest, max(seen) / max(1, per))

    def _late(self, cmd: str, deadline: Deadline) -> RemoteTimeout:
        """Stop the hung runner (on the device by its pid file, then its ssh here) and say so."""
        self.kill()
        return self.session.late(cmd, deadline.seconds, self.stderr_path)

    def kill(self) -> None:
        """Kill the runner on the device (a hung one would never read the ``bye``, nor notice its ssh gone) and
        its ssh client here."""
        if self.pid_file and self.popen.poll() is None:
            script = 'p=$(cat "$1" 2>/dev/null) && [ -n "$p" ] && kill -KILL "$p"'
            try:
                self.session.transport.run(["sh", "-c", script, "sh", self.pid_file], timeout=15)
            except RemoteError as exc:  # the device does not answer at all: its ssh going is all that is left
                log.debug("%s", exc)  # not a warning: the run ends with one line, the timeout's
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()

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
                self.popen.stdin.close()
            except OSError:
                pass
            try:
                self.popen.wait(BYE_GRACE)
            except subprocess.TimeoutExpired:  # busy in a request that never ends (Ctrl-C while it hung)
                self.kill()
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
