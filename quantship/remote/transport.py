"""How the host reaches a device: a small :class:`Transport` interface, registered by URL scheme, and its OpenSSH
implementation (the system ``ssh`` client, so the user's ``~/.ssh/config``, agent and jump hosts apply).

Every command sent to the device is an argv list joined with :func:`shlex.quote`: nothing from a file name, a
host string or an option reaches the remote shell unquoted. Locally, subprocesses are started from argv lists
(never ``shell=True``). One ControlMaster connection in a private temporary folder carries every call of a
session, so a run authenticates once.
"""

from __future__ import annotations

import abc
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import ClassVar, Sequence

from quantship.config import REMOTE_SCHEMES, RemoteOptions, RemoteURL
from quantship.errors import MissingDependencyError, RemoteError, RemoteTimeout
from quantship.fileio import atomic_path

# Host-side folders of sessions (the ControlMaster socket, stderr files); a folder left by a killed run is swept
# by the next run when the process named in it is gone.
LOCAL_PREFIX = "quantship-remote-"
# Copies to and from the device get a deadline too (a hung disk there would hang them): the fixed part
# (``--remote-timeout``, else this) plus the file's size at a slow Wi-Fi link's rate.
COPY_DEADLINE = 120.0
SLOWEST_LINK = 100_000  # bytes per second
DOWNLOAD_ALLOWANCE = 3600.0  # a download's size is not known beforehand: an engine of ~300 MB at that rate


def quote_command(argv: Sequence[str]) -> str:
    """One remote shell command line from an argv list, each word quoted."""
    return " ".join(shlex.quote(str(a)) for a in argv)


class Transport(abc.ABC):
    """Runs commands on a device and copies files to and from it.

    Subclasses register under their URL scheme (:func:`register_transport`). The protocol between host and device
    runner (JSON lines and binary frames on the runner's stdin/stdout) does not depend on the transport.
    """

    scheme: ClassVar[str]

    def __init__(self, url: RemoteURL, options: RemoteOptions):
        self.url = url
        self.options = options

    @abc.abstractmethod
    def open(self) -> None:
        """Connect (and authenticate); raise :class:`RemoteError` naming why not."""

    @abc.abstractmethod
    def close(self) -> None:
        """Drop the connection (idempotent)."""

    @abc.abstractmethod
    def argv(self, command: Sequence[str]) -> list[str]:
        """The local argv that runs ``command`` (an argv list) on the device."""

    def popen(self, command: Sequence[str], stderr_path: Path) -> subprocess.Popen:
        """Start ``command`` on the device with binary stdin/stdout pipes; its stderr goes to ``stderr_path``.

        It runs in a session of its own, so a Ctrl-C at the terminal reaches the host process only, which then
        shuts the device side down in order.
        """
        with open(stderr_path, "wb") as err:
            return subprocess.Popen(
                self.argv(command),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )

    def run(
        self, command: Sequence[str], input: bytes | None = None, timeout: float | None = None
    ) -> subprocess.CompletedProcess:
        """Run ``command`` on the device to its end; stdout and stderr captured.

        Raises:
            RemoteTimeout: Not done within ``timeout`` seconds (the ssh client is killed).
        """
        try:
            return subprocess.run(
                self.argv(command),
                input=input,
                capture_output=True,
                timeout=timeout,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            raise RemoteTimeout(
                f"{self.url.public()}: no answer within {timeout:g} s to {command[0]} and it was stopped; check the "
                "device (its disk, its connection), or raise --remote-timeout SECONDS if it is just slow"
            ) from None

    def copy_deadline(self, size: int | None) -> float:
        """Seconds a copy of ``size`` bytes may take (None: a download of unknown size)."""
        fixed = self.options.timeout if self.options.timeout is not None else COPY_DEADLINE
        return fixed + (size / SLOWEST_LINK if size is not None else DOWNLOAD_ALLOWANCE)

    def _late_copy(self, what: str, seconds: float) -> RemoteTimeout:
        return RemoteTimeout(
            f"{self.url.public()}: {what} did not finish within {seconds:g} s and was stopped; if the link is just "
            "slow, raise --remote-timeout SECONDS, else check the device (its disk, its connection)"
        )

    def upload(self, local: Path, remote: str) -> None:
        """Copy a local file to ``remote`` (written under a temporary name, then renamed into place).

        Raises:
            RemoteTimeout: Not done within :meth:`copy_deadline`.
        """
        script = 'umask 077 && cat > "$1.part" && mv -f "$1.part" "$1"'
        seconds = self.copy_deadline(local.stat().st_size)
        with open(local, "rb") as f:
            try:
                proc = subprocess.run(
                    self.argv(["sh", "-c", script, "sh", remote]),
                    stdin=f,
                    capture_output=True,
                    start_new_session=True,
                    timeout=seconds,
                )
            except subprocess.TimeoutExpired:
                raise self._late_copy(f"copying {local.name} to the device", seconds) from None
        if proc.returncode != 0:
            raise classify(self.url, proc.stderr.decode(errors="replace"), f"copying {local.name} to the device")

    def download(self, remote: str, local: Path) -> None:
        """Copy a device file to ``local`` (written atomically)."""

        seconds = self.copy_deadline(None)
        with atomic_path(local) as tmp, open(tmp, "wb") as f:
            try:
                proc = subprocess.run(
                    self.argv(["cat", remote]),
                    stdout=f,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                    timeout=seconds,
                )
            except subprocess.TimeoutExpired:
                raise self._late_copy(f"copying {remote} from the device", seconds) from None
            if proc.returncode != 0:
                raise classify(self.url, proc.stderr.decode(errors="replace"), f"copying {remote} from the device")


class SshTransport(Transport):
    """The system OpenSSH client.

    Options given by the user (``--ssh-option``) come first on the command line, so they win over quantship's
    defaults (ssh takes the first value of an option), except ``BatchMode=yes``, which always comes first: ssh
    never prompts.
    """

    scheme = "ssh"

    def __init__(self, url: RemoteURL, options: RemoteOptions):
        super().__init__(url, options)
        self._dir: Path | None = None
        self._control: Path | None = None

    def _base(self) -> list[str]:
        if shutil.which("ssh") is None:
            raise MissingDependencyError("--remote ssh:// needs the OpenSSH client: apt-get install openssh-client")
        args = ["ssh", "-o", "BatchMode=yes"]
        for key, value in self.options.ssh_options:
            args += ["-o", f"{key}={value}"]
        args += [
            "-o",
            f"ConnectTimeout={self.options.connect_timeout}",
            "-o",
            "ServerAliveInterval=5",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "LogLevel=ERROR",
        ]
        if self.options.ssh_key is not None:
            args += ["-i", str(self.options.ssh_key)]
        if self.url.port:
            args += ["-p", str(self.url.port)]
        if self.url.user:
            args += ["-l", self.url.user]
        return args

    def open(self) -> None:
        sweep_local_folders()
        self._dir = Path(tempfile.mkdtemp(prefix=f"{LOCAL_PREFIX}{os.getpid()}-", dir=local_root()))
        self._control = self._dir / "cm"
        err = self._dir / "master.err"
        argv = self._base() + [
            "-o",
            "ControlMaster=yes",
            "-o",
            f"ControlPath={self._control}",
            # The master outlives its last client by this long; a host killed outright leaves it for no longer.
            "-o",
            "ControlPersist=20",
            "-f",
            "-N",
            "--",
            self.url.host,
        ]
        with open(err, "wb") as f:
            # stderr to a file, not a pipe: the backgrounded master keeps its stderr open.
            try:
                proc = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=f,
                    timeout=self.options.connect_timeout + 15,
                    start_new_session=True,
                )
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = -1
        message = err.read_text(errors="replace")
        if code != 0:
            self.close()
            if code == -1:
                message += " Connection timed out"
            raise classify(self.url, message, "connecting")

    def argv(self, command: Sequence[str]) -> list[str]:
        control = ["-o", "ControlMaster=no", "-o", f"ControlPath={self._control}"] if self._control else []
        return self._base() + control + ["--", self.url.host, quote_command(command)]

    def close(self) -> None:
        if self._control is not None and self._control.exists():
            subprocess.run(
                self._base() + ["-o", f"ControlPath={self._control}", "-O", "exit", "--", self.url.host],
                capture_output=True,
                timeout=10,
                start_new_session=True,
            )
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = self._control = None

    @property
    def local_dir(self) -> Path | None:
        """The session's private host folder (None when closed)."""
        return self._dir


_TRANSPORTS: dict[str, type[Transport]] = {}


def register_transport(cls: type[Transport]) -> type[Transport]:
    """Add a transport under its URL scheme (``ssh``; ``adb`` would be another)."""
    _TRANSPORTS[cls.scheme] = cls
    REMOTE_SCHEMES.add(cls.scheme)
    return cls


register_transport(SshTransport)


def make_transport(options: RemoteOptions) -> Transport:
    """The (unopened) transport of ``options.url``.

    Raises:
        ConfigError: A malformed URL or an unknown scheme.
    """
    url = RemoteURL.parse(options.url)
    return _TRANSPORTS[url.scheme](url, options)


# What OpenSSH (and the device's shell) print, mapped to what the user should do. First match wins.
_SSH_ERRORS = (
    (
        "REMOTE HOST IDENTIFICATION HAS CHANGED",
        "the device's host key has CHANGED since it was recorded in known_hosts (a reinstalled device, or someone "
        "in between); check it, then remove the old key with ssh-keygen -R HOST",
    ),
    (
        "Host key verification failed",
        "the device's host key is not in known_hosts; connect once with ssh to check and record it, or pass "
        "--ssh-option StrictHostKeyChecking=accept-new",
    ),
    ("Permission denied", "authentication refused; give the key with --ssh-key FILE or load it into ssh-agent"),
    ("Too many authentication failures", "authentication refused (too many keys offered); give --ssh-key FILE"),
    ("Connection refused", "unreachable: connection refused (no SSH server on that port?)"),
    ("timed out", "unreachable: no answer within the connect timeout"),
    ("No route to host", "unreachable: no route to host"),
    ("Network is unreachable", "unreachable: network is unreachable"),
    ("Could not resolve hostname", "unreachable: the host name does not resolve"),
    ("Name or service not known", "unreachable: the host name does not resolve"),
    ("No space left on device", "the device's disk is full; free space there (or its cache: --remote-no-cache)"),
    ("Disk quota exceeded", "the device's disk quota is exceeded; free space there"),
    ("Connection closed", "the connection was closed"),
    ("Broken pipe", "the connection dropped"),
    ("Connection reset", "the connection dropped"),
)


def classify(url: RemoteURL, stderr: str, doing: str) -> RemoteError:
    """One-line :class:`RemoteError` from what ssh printed while ``doing`` something."""
    for needle, what in _SSH_ERRORS:
        if needle.lower() in stderr.lower():
            return RemoteError(f"{url.public()}: {what} ({doing})")
    last = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    detail = last[-1][:300] if last else "ssh failed without a message"
    return RemoteError(f"{url.public()}: {doing} failed: {detail}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# A Unix socket path holds at most 108 bytes (104 on macOS), and ssh adds ~17 for its temporary name: a session's
# folder goes under the system's temporary folder only when that leaves room.
MAX_SOCKET_DIR = 60


def local_root() -> str:
    """Where host-side session folders go: the temporary folder, or /tmp when its path is too long for the
    ControlMaster socket (a long TMPDIR)."""
    root = tempfile.gettempdir()
    return root if len(root) + len(LOCAL_PREFIX) + 20 <= MAX_SOCKET_DIR else "/tmp"


def sweep_local_folders() -> list[Path]:
    """Remove host-side session folders whose process is gone (a killed run's ControlMaster socket and logs);
    the master of such a folder is asked to exit first."""
    removed = []
    for folder in {p for root in {tempfile.gettempdir(), local_root()} for p in Path(root).glob(f"{LOCAL_PREFIX}*")}:
        m = re.match(rf"{LOCAL_PREFIX}(\d+)-", folder.name)
        if not m or not folder.is_dir() or _pid_alive(int(m.group(1))):
            continue
        control = folder / "cm"
        if control.exists():
            subprocess.run(
                ["ssh", "-o", f"ControlPath={control}", "-O", "exit", "quantship-stale"],
                capture_output=True,
                timeout=10,
                start_new_session=True,
            )
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def stop(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """End a local subprocess this module started: close its stdin, wait, then terminate, then kill."""
    try:
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.close()
    except OSError:
        pass
    deadline = time.monotonic() + grace
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
