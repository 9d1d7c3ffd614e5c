"""Issue 13's guard for the gateway file actions: every generated path name (case variants,
Unicode compositions, ``..``, absolute, very long, NUL, ``.git`` at depth, ``.narrative`` with
trailing dots or spaces, HFS+ ignorables, ``GIT~1``) is either written and read back
byte-identically inside the root, or refused; nothing outside the root is ever written."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import AccessDenied, ProtocolError
from narrative.credentials import is_credential_name
from narrative.paths import path_problem
from tests.e2e.security.conftest import GatewayThread, tree_digest
from tests.narrative.test_paths import paths
from tests.properties import examples


def _sendable(path: str) -> bool:
    """Whether ``path`` can travel in a JSON frame at all (lone surrogates cannot)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clear(root: Path) -> None:
    """Empty the served root, except the user's repository metadata."""
    for entry in os.scandir(root):
        if entry.name == ".git":
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


# the gateway's loop thread (and earlier tests' servers) use `random` while hypothesis draws,
# which it reports as a strategy using `random`; the draws here do not
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@settings(
    max_examples=examples(300),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(path=paths().filter(_sendable), data=st.binary(max_size=64))
def test_every_path_is_written_inside_the_root_or_refused(
    served: GatewayThread, repo: Path, tmp_path: Path, path: str, data: bytes
) -> None:
    _clear(repo)
    outside_before = {k: v for k, v in tree_digest(tmp_path).items() if not k.startswith("repo")}
    git_before = tree_digest(repo / ".git")
    content = base64.b64encode(data).decode()
    problem = path_problem(path)
    try:
        served.call("fs", "writeFile", {"path": path, "content": content, "encoding": "base64"})
    except (AccessDenied, ProtocolError) as exc:
        assert problem is not None, f"{path!r} accepted by the rule, refused by the gateway: {exc}"
        assert [e.name for e in os.scandir(repo)] == [".git"], "a refused write left something"
    else:
        assert problem is None, f"{path!r} written although the rule refuses it ({problem})"
        target = repo / path
        assert os.path.realpath(target).startswith(os.path.realpath(repo) + os.sep)
        assert target.read_bytes() == data
        if is_credential_name(path):
            try:
                served.call("fs", "readFile", {"path": path, "encoding": "base64"})
            except AccessDenied as exc:
                assert "credentials" in str(exc)
            else:
                raise AssertionError(f"{path!r} looks like a credential and was served")
        else:
            got = served.call("fs", "readFile", {"path": path, "encoding": "base64"})
            assert base64.b64decode(got["content"]) == data
    after = {k: v for k, v in tree_digest(tmp_path).items() if not k.startswith("repo")}
    assert after == outside_before, "something outside the root changed"
    assert tree_digest(repo / ".git") == git_before
