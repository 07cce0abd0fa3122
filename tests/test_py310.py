"""The package must run on Python 3.10, which many NGC containers still ship (the CI machine runs 3.11)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT


def python310() -> str | None:
    """A Python 3.10 interpreter on this machine: on PATH, or one that pyenv installed."""
    candidates = [
        shutil.which("python3.10"),
        *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10"))),
    ]
    for exe in filter(None, candidates):
        try:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.startswith("Python 3.10"):
            return exe
    return None


@pytest.mark.skipif(python310() is None, reason="no Python 3.10 interpreter on this machine")
def test_every_module_compiles_under_python_3_10():
    """Syntax and grammar of 3.11+ (``except*``, new f-string rules of 3.12) would break a 3.10 user at import."""
    files = [str(p) for folder in ("common", "resnet50", "mobilenet", "vgg", "benchmarks", "tests")
             for p in (ROOT / folder).rglob("*.py")]  # fmt: skip
    code = "import sys\nfor f in sys.argv[1:]:\n    compile(open(f, encoding='utf-8').read(), f, 'exec')\n"
    proc = subprocess.run([python310(), "-c", code, *files], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(python310() is None, reason="no Python 3.10 interpreter on this machine")
def test_the_toml_fallback_is_taken_under_python_3_10(tmp_path):
    """``tomllib`` is 3.11+: under 3.10 the preset reader must use ``tomli`` (a declared dependency there)."""
    fake = tmp_path / "tomli.py"  # stands in for the tomli wheel: the standard interface, backed by a marker
    fake.write_text("class TOMLDecodeError(ValueError):\n    pass\n\ndef loads(text):\n    return {'from': 'tomli'}\n")
    code = f"import common.config as c\nprint(c.load_preset({str(ROOT / 'resnet50' / 'preset.toml')!r}, None))\n"
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "PATH": os.environ.get("PATH", "")}
    proc = subprocess.run([python310(), "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "'from': 'tomli'" in proc.stdout
