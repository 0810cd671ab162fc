"""Atomic writes, hashing and small JSON helpers shared by every module that writes artifacts."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from quantship.errors import ConfigError, DataError

TEMP_DIR = ".quantship-tmp"  # temporary folders of a run, inside its output folder
# Temporary names carry the process id, so a later run can tell a dead run's leftovers from a live one's.
_ATOMIC_TMP = re.compile(r"^\..+\.(\d+)-[^.]+\.tmp")
_TEMP_ENTRY = re.compile(r"^[A-Za-z0-9_]+-(\d+)-")


def file_mode(directory: bool = False) -> int:
    """The permission bits a new file (or folder) gets under the process's umask (0644 / 0755 under umask 022)."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    try:  # Linux >= 4.7 shows it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or exception in the block leaves ``path`` untouched (old content or absent), never half
    written; a killed process leaves a ``.NAME.PID-XXXX.tmp`` file that :func:`sweep_temp_files` removes at the
    start of the next run. ``suffix`` keeps an extension that some writers insist on (Keras wants ``.keras``).
    The file ends up with the permissions of any new file under the user's umask (not ``mkstemp``'s 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def make_temp_dir(out_dir: str | os.PathLike | None, prefix: str) -> Path:
    """A new temporary folder inside ``out_dir/.quantship-tmp`` (the system's temp folder when ``out_dir`` is
    None), named ``PREFIX-PID-XXXX`` so that :func:`sweep_temp_files` can remove it once its process is gone.
    The caller removes it with :func:`remove_temp_dir`."""
    base = None
    if out_dir is not None:
        base = Path(out_dir) / TEMP_DIR
        base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=base))


def remove_temp_dir(path: str | os.PathLike) -> None:
    """Remove a folder made by :func:`make_temp_dir`, and ``.quantship-tmp`` with it once empty."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    if path.parent.name == TEMP_DIR:
        with contextlib.suppress(OSError):
            path.parent.rmdir()


@contextlib.contextmanager
def temp_dir(out_dir: str | os.PathLike | None, prefix: str) -> Iterator[Path]:
    """:func:`make_temp_dir` for the duration of a block: removed when it ends, on an exception and on Ctrl-C."""
    tmp = make_temp_dir(out_dir, prefix)
    try:
        yield tmp
    finally:
        remove_temp_dir(tmp)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # swept at the start of a run: nothing of this run exists yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_file_owner(name: str) -> int | None:
    """The process id in an atomic-write temporary's name (``.NAME.PID-XXXX.tmp``), None for another name."""
    m = _ATOMIC_TMP.match(name)
    return int(m.group(1)) if m else None


def process_gone(pid: int) -> bool:
    """True when no process ``pid`` runs on this machine (this process counts as running)."""
    return pid != os.getpid() and not _pid_alive(pid)


def sweep_temp_files(folder: str | os.PathLike, depth: int = 3) -> list[Path]:
    """Remove what killed runs left in an output folder: atomic-write temporaries (``.NAME.PID-XXXX.tmp*``) and
    ``.quantship-tmp/`` folders of processes that no longer run (a live run's are kept).

    Returns:
        What was removed.
    """
    removed: list[Path] = []
    root = Path(folder)
    if not root.is_dir():
        return removed

    def walk(d: Path, level: int) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for e in entries:
            p = Path(e.path)
            if e.name == TEMP_DIR and e.is_dir(follow_symlinks=False):
                for sub in list(p.iterdir()):
                    m = _TEMP_ENTRY.match(sub.name)
                    if m and not _pid_alive(int(m.group(1))):
                        shutil.rmtree(sub, ignore_errors=True) if sub.is_dir() else sub.unlink(missing_ok=True)
                        removed.append(sub)
                with contextlib.suppress(OSError):
                    p.rmdir()
            elif (m := _ATOMIC_TMP.match(e.name)) and not _pid_alive(int(m.group(1))):
                shutil.rmtree(p, ignore_errors=True) if e.is_dir(follow_symlinks=False) else p.unlink(missing_ok=True)
                removed.append(p)
            elif level < depth and e.is_dir(follow_symlinks=False):
                walk(p, level + 1)

    walk(root, 0)
    return removed


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> None:
    """Make sure ``path`` is (or can become) a folder this process can write into, before any work: a file in
    its place, a parent that is a file, a read-only or pseudo file system (``/proc``) are refused. Nothing is
    left behind: folders created for the check are removed again.

    Raises:
        ConfigError: Naming the option, the path and what to do.
    """

    if not str(path).strip():
        raise ConfigError(f"{option} '': an empty path (it would write into the current folder); give a folder")
    path = Path(path).expanduser()
    created: list[Path] = []
    probe: Path | None = None
    try:
        if path.exists() and not path.is_dir():  # exists() itself fails on a name too long for the file system
            raise ConfigError(f"{option} {path}: is a file, not a folder; give a folder (it is created if missing)")
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        if not p.is_dir():
            raise ConfigError(f"{option} {path}: {p} is a file, so no folder can be made there; give another path")
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        fd, name = tempfile.mkstemp(prefix=f".write-check.{os.getpid()}-", suffix=".tmp", dir=path)
        probe = Path(name)
        os.write(fd, b"ok")
        os.close(fd)
    except ConfigError:
        raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"{option} {path}: cannot write there ({reason}); give a folder you can write to") from None
    finally:
        if probe is not None:
            with contextlib.suppress(OSError):
                probe.unlink()
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON line and fsync, so a stored row survives a kill right after this returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, sort_keys=True, default=_json_default) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read JSON lines, ignoring a torn last line left by a kill mid-write."""
    rows: list[dict] = []
    path = Path(path)
    if not path.exists():
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def read_text(path: str | os.PathLike, error: type | None = None) -> str:
    """A text file (data list, ground truth, plan) as UTF-8; a file that cannot be read, or a byte that is not
    UTF-8, raises ``error`` (:class:`~quantship.errors.DataError` by default) naming the file and line."""

    error = error or DataError
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, or of every file under a directory (sorted, names included)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def cache_dir() -> Path:
    """Where derived files (ported weights, model statistics) are cached: ``$QUANTSHIP_CACHE`` or
    ``~/.cache/quantship``."""
    root = os.environ.get("QUANTSHIP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "quantship")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


LOCK_NAME = ".quantship.lock"


def remove_unused_lock(folder: str | os.PathLike) -> None:
    """Remove the lock file of a folder that holds nothing else, unless a process holds the lock (for a run that
    created the folder and was refused before writing anything)."""

    path = Path(folder) / LOCK_NAME
    try:
        if {p.name for p in Path(folder).iterdir()} != {LOCK_NAME}:
            return
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink()
    except OSError:
        pass
    finally:
        os.close(fd)


class FolderLock:
    """An exclusive OS lock (``flock``) on a lock file inside an output folder, held by the process that runs a
    job: a second run writing to the same folder is refused, naming the folder and the process that holds it.
    The kernel releases the lock when the holder exits, even on ``kill -9``. Readers (``quantship report``)
    take no lock.

    Raises:
        ConfigError: Another process holds the folder.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "quantship"):
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise ConfigError(
                f"{self.folder} is in use by another run ({holder}); wait for it to finish or give another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()}: {self.what}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
