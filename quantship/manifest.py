"""Artifacts on disk: written atomically, each with a JSON manifest beside it that says what made it."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantship.fileio import sha256_file, write_bytes_atomic, write_json_atomic

TOOL_DISTRIBUTIONS = ("quantship", "tensorflow", "keras", "ai-edge-litert", "tf2onnx", "onnx", "onnxruntime", "numpy")


def tool_versions(names: tuple[str, ...] = TOOL_DISTRIBUTIONS) -> dict[str, str]:
    """Installed versions of the tools that matter for reproducing an artifact."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def manifest_path(artifact: str | Path) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


@dataclass(frozen=True)
class Artifact:
    """A converted model file and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def manifest_path(self) -> Path:
        return manifest_path(self.path)


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
        "tools": tool_versions(),
        **manifest,
    }
    write_json_atomic(manifest_path(path), full)
    return Artifact(path, full)


def load_reusable(path: str | Path, build_key: str) -> Artifact | None:
    """Return the artifact at ``path`` if its manifest was made from the same inputs (``build_key``) and the
    file still matches its recorded hash; otherwise None (it will be rebuilt)."""
    path = Path(path)
    mpath = manifest_path(path)
    if not path.exists() or not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("build_key") != build_key or manifest.get("sha256") != sha256_file(path):
        return None
    return Artifact(path, manifest)


def write_onnx_artifact(proto: Any, path: str | Path, manifest: dict[str, Any]) -> Artifact:
    """Serialise an ``onnx.ModelProto`` to ``path`` atomically with its manifest (format and opset recorded)."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return write_artifact(path, proto.SerializeToString(), {"format": "onnx", "opset": opset, **manifest})
