"""The Makefile picks the interpreter a new user expects (dry runs, nothing installed).

Outside a virtual environment it must create and use its own venv: a fresh Debian's
system python3 refuses `pip install` (PEP 668).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(target: str, **env_overrides: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHON", "VENV", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(env_overrides)
    out = subprocess.run(["make", "--no-print-directory", "-n", "-B", target], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout


def test_outside_a_venv_creates_and_uses_its_own(tmp_path):
    venv = tmp_path / "venv"
    out = dry_run("install", VENV=str(venv))
    assert f"python3 -m venv {venv}" in out
    assert f"{venv}/bin/python -m pip install" in out
    assert "python3 -m pip" not in out


def test_inside_a_venv_uses_it():
    out = dry_run("install", VIRTUAL_ENV="/opt/somevenv")
    assert "/opt/somevenv/bin/python -m pip install" in out
    assert "-m venv" not in out


def test_python_variable_wins():
    out = dry_run("test", PYTHON="/usr/local/bin/mypython", VIRTUAL_ENV="/opt/somevenv")
    assert "/usr/local/bin/mypython -m pip install" in out
    assert "/usr/local/bin/mypython -m pytest" in out
    assert "-m venv" not in out


def test_demo_says_where_the_image_is():
    out = dry_run("demo", PYTHON="python")
    assert "out/demo.png" in out.splitlines()[-1]
