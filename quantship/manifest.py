"""Artifacts on disk: written atomically, each with a JSON manifest beside it that says what made it."""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantship.fileio import sha256_file


def installed_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of the distributions ``names``; absent ones left out. Which names to ask for is
    :func:`quantship.runtime.registry.tool_distributions` (the one list)."""
    out = {}
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
