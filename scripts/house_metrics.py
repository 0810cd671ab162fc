"""Figures of the package's shape, repeatable (issue 24): imports inside functions, functions with many parameters,
the longest functions, the largest module per layer, the layers' import cycles and private names imported across
modules.

Run: ``python scripts/house_metrics.py [--top 10] [--params 8]`` from the repository root.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "quantship"
FLOOR = {"errors", "lazy", "fileio", "logs", "progress", "safe_pickle", "config", "manifest", "trt_util", "cuda"}
HEAVY = {"tensorflow", "keras", "ai_edge_litert", "onnxruntime", "tf2onnx", "tensorrt", "ray", "onnx", "torch", "cv2"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in FLOOR or not ((ROOT / parts[1]).is_dir() or (ROOT / f"{parts[1]}.py").exists()):
        return "floor"
    return parts[1]


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def nested_imports(tree: ast.AST) -> list[tuple[ast.stmt, bool]]:
    """Imports inside functions: (node, internal?) for each."""
    out = []
    for fn in functions(tree):
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                out += [(node, a.name.split(".")[0] == "quantship") for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.append((node, node.module.split(".")[0] == "quantship"))
    return out


def heavy(node: ast.stmt) -> bool:
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    return any(n.split(".")[0] in HEAVY for n in names)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--params", type=int, default=8, help="count functions with at least this many parameters")
    args = p.parse_args(argv)
    longest, many_params, sizes = [], [], defaultdict(list)
    inside = {"internal": 0, "heavy": 0, "other": 0}
    internal_total = 0
    private_cross, graph = [], defaultdict(set)
    for path in sorted(ROOT.rglob("*.py")):
        mod = module_name(path)
        text = path.read_text()
        tree = ast.parse(text)
        sizes[layer(mod)].append((len(text.splitlines()), mod))
        for fn in functions(tree):
            n = len(fn.args.args) + len(fn.args.kwonlyargs) + len(fn.args.posonlyargs)
            n -= 1 if fn.args.args and fn.args.args[0].arg in ("self", "cls") else 0
            longest.append((fn.end_lineno - fn.lineno + 1, f"{mod}.{fn.name}"))
            if n >= args.params:
                many_params.append((n, f"{mod}.{fn.name}"))
        for node, internal in nested_imports(tree):
            inside["internal" if internal else ("heavy" if heavy(node) else "other")] += 1
        checking_only = {
            id(n)
            for top in tree.body
            if isinstance(top, ast.If) and isinstance(top.test, ast.Name) and top.test.id == "TYPE_CHECKING"
            for n in ast.walk(top)
        }
        for node in ast.walk(tree):
            if id(node) in checking_only:  # never imported at run time: no cycle, not counted
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("quantship"):
                internal_total += 1
                graph[mod].add(node.module)
                private_cross += [
                    f"{mod} <- {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.endswith("__")
                ]
            elif isinstance(node, ast.Import):
                internal_total += sum(a.name.startswith("quantship") for a in node.names)
    cycles = set()
    for a in graph:
        for b in graph[a]:
            if b in graph and a in graph[b] and layer(a) == layer(b) and a != b:
                cycles.add(tuple(sorted((a, b))))
    print(
        f"internal imports: {internal_total}; imports inside functions: {sum(inside.values())} "
        f"(quantship {inside['internal']}, heavy libraries {inside['heavy']}, other {inside['other']})"
    )
    print(f"functions with >= {args.params} parameters: {len(many_params)}")
    for n, name in sorted(many_params, reverse=True):
        print(f"  {n:3d}  {name}")
    print(f"the {args.top} longest functions (lines):")
    for n, name in sorted(longest, reverse=True)[: args.top]:
        print(f"  {n:4d}  {name}")
    print("largest module per layer (lines):")
    for lay, mods in sorted(sizes.items()):
        n, name = max(mods)
        print(f"  {lay:12s} {n:5d}  {name}  ({len(mods)} modules, {sum(m for m, _ in mods)} lines)")
    print(f"two-module import cycles inside a layer: {len(cycles)}")
    for a, b in sorted(cycles):
        print(f"  {a} <-> {b}")
    print(f"private names imported across modules: {len(private_cross)}")
    for line in private_cross:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
