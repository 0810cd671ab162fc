"""``quantship convert`` stopped mid-conversion (its bad-input rows go here too, see :mod:`bad_inputs.table`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import TINY_PREPROCESS


@pytest.mark.slow
def test_killed_conversion_leaves_no_temporary_files(trained_tiny, tmp_path):
    """``kill`` (SIGTERM) during the SavedModel export behind TFLite conversion: exit 130, one line, and neither the
    export nor any atomic-write temporary is left in the output folder."""
    import signal
    import time

    _, model = trained_tiny
    out = tmp_path / "out"
    argv = ["convert", "--model", str(model), "--preprocess", TINY_PREPROCESS, "--targets", "tflite-fp32"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantship", *argv, "--out", str(out), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(out.glob(".quantship-tmp/savedmodel-*/model/*")) and proc.poll() is None:
        assert time.monotonic() < deadline, "the export never started"
        time.sleep(0.02)
    assert proc.poll() is None, "the conversion ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert [ln for ln in err.splitlines() if ln.strip()] == ["quantship convert: interrupted"]
    left = [p for p in out.rglob("*") if ".tmp" in p.name or p.name == ".quantship-tmp"]
    assert not left, left
