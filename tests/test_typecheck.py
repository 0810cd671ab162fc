"""scripts/typecheck.sh catches what reading TensorRT code misses: a misspelt TensorRT method and an argument of the
wrong type, in a copy of the engine builder, and through the type ``import_tensorrt()`` returns."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "typecheck.sh"

needs_pyright = pytest.mark.skipif(
    shutil.which("node") is None or importlib.util.find_spec("pyright") is None,
    reason="needs Node.js and pyright (pip install pyright==1.1.414; .ci/run installs both)",
)


def _typecheck(*files: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *map(str, files)], capture_output=True, text=True, env=env, cwd=ROOT)


@needs_pyright
def test_a_misspelt_tensorrt_method_and_a_wrong_argument_type_fail_the_check(tmp_path):
    source = (ROOT / "quantship" / "convert" / "tensorrt.py").read_text()
    assert "config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mb << 20)" in source
    assert "network = builder.create_network(flags)" in source
    planted = source.replace(
        "network = builder.create_network(flags)", "network = builder.create_netwrk(flags)"
    ).replace(
        "config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mb << 20)",
        'config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, f"{spec.workspace_mb} MiB")',
    )
    (copy := tmp_path / "tensorrt_planted.py").write_text(planted)
    # import_tensorrt() is typed as the tensorrt module: a misspelling through it is caught too.
    (caller := tmp_path / "caller.py").write_text(
        "from quantship.trt_util import import_tensorrt\n\n"
        "def build() -> None:\n"
        "    trt = import_tensorrt()\n"
        "    trt.Builder(trt.Logger()).create_builder_confg()\n"
    )
    out = _typecheck(copy, caller)
    report = out.stdout + out.stderr
    assert out.returncode != 0, report
    assert 'Cannot access attribute "create_netwrk" for class "Builder"' in report, report
    assert '"set_memory_pool_limit"' in report and 'parameter "pool_size"' in report, report
    assert 'Cannot access attribute "create_builder_confg" for class "Builder"' in report, report
    assert report.count(" - error") == 3, report  # nothing else in the copy fails: the unplanted module is clean
