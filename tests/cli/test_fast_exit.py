"""The ``narrative`` command ends without the interpreter's teardown (``cli.main._end_now``
runs last of the exit handlers): its exit status, everything it wrote and every exit handler
registered while it ran survive that."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

_WRAPPED = """
import atexit, importlib, sys
entry = importlib.import_module("cli.main")  # (the package's "main" is the function)
command, mark = entry.cli, sys.argv[1]
def wrapped(**kw):
    atexit.register(lambda: open(mark, "w").write("ran"))
    print("x" * (1 << 20), end="")  # more than any pipe buffer
    try:
        return command(**kw)
    finally:
        print("tail", end="")  # a few bytes left in the buffer at exit
entry.cli = wrapped
sys.argv = ["narrative", *sys.argv[2:]]
entry.main()
"""


def narrative(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    mark = tmp_path / "handler-ran"
    mark.unlink(missing_ok=True)
    return subprocess.run(
        [sys.executable, "-c", _WRAPPED, str(mark), *args],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "status"),
    [(("--version",), 0), (("show", "nothing-here"), 1), (("--no-such-option",), 2)],
)
def test_status_output_and_exit_handlers_survive(
    tmp_path: Path, args: tuple[str, ...], status: int
) -> None:
    done = narrative(tmp_path, *args)
    assert done.returncode == status, done.stderr
    assert done.stdout.startswith(b"x" * (1 << 20))
    assert done.stdout.endswith(b"tail")
    assert (tmp_path / "handler-ran").read_text() == "ran"


def test_a_crash_still_exits_1_with_its_traceback(tmp_path: Path) -> None:
    crash = (
        "import importlib, sys\nm = importlib.import_module('cli.main')\n"
        "m.cli = lambda **kw: 1 / 0\nsys.argv = ['narrative']\nm.main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", crash], check=False, capture_output=True, timeout=120
    )
    assert done.returncode == 1
    assert b"ZeroDivisionError" in done.stderr
