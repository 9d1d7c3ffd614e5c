"""The built wheel works on its own (issue 14 item 10): built from this checkout, installed
into a fresh virtual environment (dependencies from the package index), it runs the demo with
nothing of the checkout on the path."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LISTER_CHECK = (
    "import narrative._listing as m, narrative.walker as s\n"
    "assert s.NATIVE_LISTER is m.list_dir\n"
    "print(m.__file__)"
)


@pytest.mark.long
def test_the_wheel_installs_into_a_fresh_venv_and_runs_the_demo(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = wheels.glob("narrative_engine-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import cli, narrative; print(narrative.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(venv)), where  # the installed copy, not this checkout
    compiler = shlex.split(sysconfig.get_config_var("CC") or "cc")[0]
    if shutil.which(compiler):  # the wheel carries the snapshot walk's C lister (hatch_build.py)
        lister = subprocess.run(
            [str(venv / "bin" / "python"), "-c", LISTER_CHECK],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert lister.returncode == 0, lister.stderr
        assert lister.stdout.startswith(str(venv)), lister.stdout
    demo = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "demo finished" in demo.stdout


@pytest.mark.long
def test_a_pure_wheel_is_built_on_request(tmp_path: Path) -> None:
    """``NARRATIVE_PURE_WHEEL=1``: one wheel for any Python (docker/Dockerfile), no C inside."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
        env={**os.environ, "NARRATIVE_PURE_WHEEL": "1"},
    )
    [wheel] = tmp_path.glob("narrative_engine-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        assert not [n for n in archive.namelist() if n.endswith(".so")], archive.namelist()
