"""The package's imports point down the layers (DESIGN.md): read every module's imports with ``ast`` and fail on
an edge outside the allowed table."""

from __future__ import annotations

import ast
from pathlib import Path

import quantship

PACKAGE = Path(quantship.__file__).parent
FLOOR = {"errors", "lazy", "fileio", "logs", "progress", "safe_pickle", "config", "manifest", "trt_util", "cuda"}

# layer -> the layers its modules may import (a layer may always import itself and the floor). DESIGN.md's order:
# cli -> jobs -> {targets, remote, sensitivity, signoff} -> {evaluate, convert} -> {calibrate, runtime, models, data}
# -> floor. Inside the middle group, sensitivity and sign-off build their variants through the target registry, so
# they may import targets; targets imports neither of them, and no two of them import each other otherwise.
BELOW_TARGETS = {"evaluate", "convert", "calibrate", "runtime", "models", "data"}
ALLOWED = {
    "floor": set(),
    "data": set(),
    "models": {"data"},
    "runtime": set(),
    "calibrate": {"runtime"},
    "convert": {"calibrate", "runtime"},
    "evaluate": {"data", "models", "runtime"},
    "targets": BELOW_TARGETS,
    "remote": {"runtime", "data", "evaluate"},
    "sensitivity": {"targets"} | BELOW_TARGETS,
    "signoff": {"targets"} | BELOW_TARGETS,
    "jobs": {"targets", "remote", "sensitivity", "signoff"} | BELOW_TARGETS,
    "cli": {"jobs"},
    "__main__": {"cli"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "floor"
    head = parts[1]
    is_module = (PACKAGE / head).is_dir() or (PACKAGE / f"{head}.py").is_file()
    if head in FLOOR or not is_module:  # a name defined in quantship/__init__.py (__version__) is the floor
        return "floor"
    return head


def imports_of(path: Path) -> set[str]:
    """Every ``quantship.*`` module a file imports, at any depth (lazy imports inside functions included)."""
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "quantship"}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] == "quantship"
        ):
            if node.module == "quantship":  # from quantship import x: x is a module or a name of the floor
                out |= {f"quantship.{a.name}" for a in node.names}
            else:
                out.add(node.module)
    return out


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def edges() -> list[tuple[str, str, str, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = module_name(path)
        for dst in imports_of(path):
            out.append((src, dst, layer_of(src), layer_of(dst)))
    return out


def test_every_import_points_down_the_layers():
    assert set(ALLOWED) >= {layer_of(module_name(p)) for p in PACKAGE.rglob("*.py")}, "a module outside the layer table"
    bad = [
        f"{src} -> {dst} ({a} may not import {b})"
        for src, dst, a, b in edges()
        if b != a and b != "floor" and b not in ALLOWED[a]
    ]
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_runtime_and_models_stay_low():
    """The rules the design spells out, checked by name so that widening the table above cannot hide them."""
    for src, dst, a, b in edges():
        if a == "runtime":
            assert b not in ("convert", "evaluate", "jobs", "calibrate", "cli"), f"{src} -> {dst}"
        if a == "models":
            assert b not in ("runtime", "convert", "evaluate", "calibrate", "jobs"), f"{src} -> {dst}"
        if a == "calibrate":
            assert b != "convert", f"{src} -> {dst}"
        if a == "evaluate":
            assert b not in ("convert", "calibrate", "targets", "jobs"), f"{src} -> {dst}"
        if a == "targets":
            assert b not in ("sensitivity", "signoff", "remote", "jobs"), f"{src} -> {dst}"
        if a in ("sensitivity", "signoff"):
            assert b not in ("sensitivity", "signoff", "remote", "jobs") or b == a, f"{src} -> {dst}"
        if a == "floor":
            assert b == "floor", f"{src} -> {dst}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """A deliberately wrong edge is caught (the test can fail)."""
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from quantship.jobs.eval import run_eval\n")
    assert imports_of(bad) == {"quantship.jobs.eval"}
    assert layer_of("quantship.runtime.tflite") == "runtime" and "jobs" not in ALLOWED["runtime"]
