"""Every benchmark and script still runs against today's package (issue 26).

``benchmarks/int8_fidelity.py`` imported a module deleted before the script was committed and failed after 40
minutes of work; ``scripts/trt_smoke.sh`` imported a module that had moved. So:

* every ``benchmarks/*.py`` that is a program runs its ``--smoke`` mode (a tiny model, a few images, seconds), found
  by glob so that a script added later is covered; a helper module (no ``__main__``) is imported;
* every file under ``scripts/`` is exercised as far as a machine without a GPU allows: a shell script is
  syntax-checked and, when it requires arguments, run without them (its usage message, exit code not 0, nothing
  else run), the quantship modules and names it imports must exist, and the ``quantship`` command lines it runs
  must parse; a Python script is run with ``--help``.

The smoke runs are subprocesses (each script is a program) and take about 10-15 s each on a quiet 2-core machine:
marked slow.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))
SCRIPTS = sorted(p for p in (ROOT / "scripts").rglob("*") if p.is_file())


def _is_program(path: Path) -> bool:
    return "__main__" in path.read_text(encoding="utf-8")


@pytest.fixture
def short_tmp():
    """A temporary folder with a short path (the scripts' mkdtemp folders go there): OpenSSH's control socket
    path must fit a Unix socket name (108 bytes), which pytest's own folders can exceed."""
    folder = Path(tempfile.mkdtemp(prefix="qs"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _env(tmp_path: Path, temp: Path | None = None) -> dict[str, str]:
    """The package of this checkout, temporary folders (mkdtemp) under ``temp`` (else ``tmp_path``), caches under
    ``tmp_path``."""
    env = {**os.environ, "TMPDIR": str(temp or tmp_path), "QUANTSHIP_CACHE": str(tmp_path / "cache")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.pop("RAY_ADDRESS", None)
    return env


def test_benchmarks_are_found():
    names = {p.name for p in BENCHMARKS}
    assert {"int8_fidelity.py", "calibration.py", "smoke.py"} <= names, names


@pytest.mark.slow
@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_smoke(script: Path, tmp_path, short_tmp):
    if not _is_program(script):  # a helper module the scripts share (photos.py, smoke.py)
        code = f"import sys; sys.path.insert(0, {str(script.parent)!r}); import {script.stem}"
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(tmp_path))
        assert res.returncode == 0, res.stderr[-3000:]
        return
    text = script.read_text(encoding="utf-8")
    assert '"--smoke"' in text, f"{script.name} has no --smoke mode (a tiny model, a few images, seconds)"
    argv = [sys.executable, str(script), "--smoke"]
    if re.search(r'add_argument\(\s*"--out"', text):  # results go under tmp_path, not the working folder
        argv += ["--out", str(tmp_path / "out")]
    res = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=_env(tmp_path, short_tmp), timeout=600)
    tail = f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert res.returncode == 0, f"{script.name} --smoke: exit {res.returncode}\n{tail}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ scripts/


def test_scripts_are_found():
    assert any(p.name == "trt_smoke.sh" for p in SCRIPTS), SCRIPTS


def _shell_words(command: str, defaults: dict[str, str]) -> list[str]:
    """A shell command line as words: ``${VAR:+word}`` taken as ``word``, a variable as its default in the script
    (``LIMIT=${3:-1000}``) or else as its name."""
    command = re.sub(r"\$\{\w+:\+([^}]*)\}", r"\1", command)
    command = re.sub(
        r"\$\{(\w+)[^}]*\}|\$(\w+)", lambda m: defaults.get(m.group(1) or m.group(2), m.group(1) or m.group(2)), command
    )
    return shlex.split(command, comments=True)


def _logical_lines(text: str) -> list[str]:
    return re.sub(r"\\\n\s*", " ", text).splitlines()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script(script: Path, tmp_path):
    from quantship.cli import build_parser

    text = script.read_text(encoding="utf-8")
    env = _env(tmp_path)
    if script.suffix == ".py":
        res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        return
    assert script.suffix == ".sh", f"{script}: no check for this kind of script"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, "bash -n failed"

    # Every quantship module and name the script imports exists (import X / from X import a, b).
    imports = re.findall(r"from (quantship[\w.]*) import ([\w, ]+)|import (quantship[\w.]*)", text)
    for module, names, plain in imports:
        mod = importlib.import_module(module or plain)
        for name in [n.strip() for n in names.split(",") if n.strip()]:
            assert hasattr(mod, name), f"{script.name}: {module} has no {name}"

    # Every quantship command line parses with today's parser.
    parser = build_parser()
    defaults = dict(re.findall(r"^(\w+)=\$\{\w+:-([^}]*)\}", text, flags=re.M))
    lines = [_shell_words(line, defaults) for line in _logical_lines(text)]
    commands = [w for w in lines if w[:1] == ["quantship"]]
    runs = re.search(r"^\s*quantship\s", text, flags=re.M)
    assert commands or not runs, f"{script.name}: its quantship command lines were not found"
    for words in commands:
        try:
            parser.parse_args(words[1:])
        except SystemExit as exc:
            assert exc.code in (0, None), f"{script.name}: quantship {' '.join(words[1:])} does not parse"

    # Without its required arguments (``${1:?usage...}``): the usage line, and nothing run (no GPU needed to get
    # there). A script whose arguments are all optional would run its work: tested where that work is (its own test).
    if not re.search(r"\$\{1:\?", text):
        return
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert res.returncode != 0 and "usage" in res.stderr.lower(), (res.returncode, res.stderr[-2000:])
    assert not list(tmp_path.glob("runs")), "ran work without arguments"
