"""The one-command read of a spawned process's log (``tail_argv`` / ``tail_read``) that the
providers reaching into an environment by exec use, run by a real ``sh``, against
:func:`providers.base.tail_start` on the same bytes."""

from __future__ import annotations

import subprocess
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from providers.base import SpawnLog, tail_argv, tail_read, tail_start
from tests.properties import examples


def read(path: Path, since: int, limit: int) -> SpawnLog:
    done = subprocess.run(tail_argv(str(path), since, limit), capture_output=True, check=False)
    return tail_read(done.returncode, done.stdout)


@settings(max_examples=examples(40), deadline=None)
@given(
    content=st.binary(max_size=300),
    since=st.integers(min_value=0, max_value=400),
    limit=st.integers(min_value=0, max_value=400),
)
def test_reads_what_tail_start_says(tmp_path_factory, content, since, limit):
    path = tmp_path_factory.mktemp("log") / "spawn.log"
    path.write_bytes(content)
    got = read(path, since, limit)
    start = tail_start(len(content), since, limit)
    assert got == SpawnLog(len(content), content[start:])


def test_no_log_reads_empty(tmp_path):
    assert read(tmp_path / "missing.log", 0, 100) == SpawnLog(0, b"")
    assert tail_read(0, b"") == SpawnLog(0, b"")
    assert tail_read(0, b"garbage\nmore") == SpawnLog(0, b"")


def test_a_name_with_spaces_and_newlines(tmp_path):
    path = tmp_path / "a b\nc.log"
    path.write_bytes(b"line one\nline two\n")
    assert read(path, 9, 100) == SpawnLog(18, b"line two\n")
