"""Writing a converted artifact: the file, then the JSON manifest beside it that says what made it (the manifest
last, so a manifest on disk always describes a complete artifact). Reading them back: :mod:`quantship.manifest`."""

from __future__ import annotations

import datetime as _dt
import platform
from pathlib import Path
from typing import Any

from quantship.fileio import sha256_file, write_bytes_atomic, write_json_atomic
from quantship.manifest import Artifact, manifest_path
from quantship.runtime.registry import tool_versions


def write_artifact(path: str | Path, data: bytes | None, manifest: dict[str, Any]) -> Artifact:
    """Write ``data`` (or keep the file already at ``path`` when None) and then its manifest, both atomically.

    The manifest is written last, so a manifest on disk always describes a complete artifact.
    """
    path = Path(path)
    if data is not None:
        write_bytes_atomic(path, data)
    full = {
        "artifact": path.name,
        "sha256": sha256_file(path),
        "size_bytes": sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tools": {"python": platform.python_version(), **tool_versions()},  # the runtime registry keeps the list
        **manifest,
    }
    write_json_atomic(manifest_path(path), full)
    return Artifact(path, full)


def write_onnx_artifact(proto: Any, path: str | Path, manifest: dict[str, Any]) -> Artifact:
    """Serialise an ``onnx.ModelProto`` to ``path`` atomically with its manifest (format and opset recorded)."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return write_artifact(path, proto.SerializeToString(), {"format": "onnx", "opset": opset, **manifest})
