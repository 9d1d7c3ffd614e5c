"""Issue 13, attacks 2 and 4, against the real gateway over a real WebSocket.

Attack 2: an agent writes the user's repository metadata (``.git/config`` with a
``core.fsmonitor`` program, a hook) or the shadow store through ``fs:writeFile``, and the user's
next ``git status`` runs its program. Reads of ``.git``, ``.env`` and keys leak secrets.
Attack 4: an agent swaps a directory for a symlink to outside the root between the gateway's
check and its open.

Every attack also runs once against ``unguarded:*``, the file actions without the guards (check
then open by name, as before the fix), to show the attack really lands there: the canary
program runs, the secret is read, the file outside is reached.
"""

from __future__ import annotations

import base64
import ctypes
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway.errors import AccessDenied, GatewayError
from tests.e2e.security.conftest import GatewayThread, tree_digest

CANARY = "CANARY"


@pytest.fixture
def canary(tmp_path: Path) -> tuple[Path, Path]:
    """A program outside the root that leaves a canary file when anything runs it."""
    marker = tmp_path / CANARY
    program = tmp_path / "canary.sh"
    program.write_text(f"#!/bin/sh\ntouch {marker}\n")
    program.chmod(0o755)
    return program, marker


def payload_for(kind: str, repo: Path, program: Path) -> bytes:
    if kind == "config":  # the user's config, plus a monitor every `git status` runs
        config = (repo / ".git" / "config").read_text()
        return f"{config}[core]\n\tfsmonitor = {program}\n".encode()
    if kind == "hook":
        return f"#!/bin/sh\n{program}\n".encode()
    return b"planted\n"


def run_user_git(repo: Path) -> None:
    """What the user does next in their repository: look at it, switch branches."""
    for argv in (["git", "status"], ["git", "checkout", "-q", "-b", "next"]):
        subprocess.run(argv, cwd=repo, capture_output=True, check=False)


WRITE_ATTACKS = [
    (".git/config", "config", "'.git' component"),
    (".git/hooks/post-checkout", "hook", "'.git' component"),
    (".GIT/config", "config", "'.git' component"),
    (".git./config", "config", "'.git' component"),
    ("git~1/config", "config", "'.git' component"),
    (".narrative/x", "plain", "shadow store"),
    (".Narrative/x", "plain", "shadow store"),
    (".narrative/hooks/post-checkout", "hook", "shadow store"),
]


@pytest.mark.parametrize(("path", "kind", "reason"), WRITE_ATTACKS)
def test_write_into_repository_metadata_is_refused(
    served: GatewayThread, repo: Path, canary: tuple[Path, Path], path: str, kind: str, reason: str
) -> None:
    program, marker = canary
    data = payload_for(kind, repo, program)
    before = tree_digest(repo)
    with pytest.raises(AccessDenied, match=reason):
        served.call("fs", "writeFile", {"path": path, "content": data.decode()})
    with pytest.raises(AccessDenied):
        served.call("fs", "deleteFile", {"path": path})
    assert tree_digest(repo) == before
    run_user_git(repo)
    assert not marker.exists()


@pytest.mark.parametrize(("path", "kind", "reason"), WRITE_ATTACKS)
def test_negative_control_unguarded_write_lands(
    served: GatewayThread, repo: Path, canary: tuple[Path, Path], path: str, kind: str, reason: str
) -> None:
    program, marker = canary
    data = payload_for(kind, repo, program)
    served.call(
        "unguarded", "writeFile", {"path": path, "content": base64.b64encode(data).decode()}
    )
    assert (repo / path).read_bytes() == data
    run_user_git(repo)
    if path in (".git/config", ".git/hooks/post-checkout"):
        # here (a case-sensitive file system) only these two are the real .git; the look-alikes
        # are .git on macOS and Windows, where the same write would run the canary too
        assert marker.exists(), "the unguarded write should have planted a program git runs"


READ_ATTACKS = [
    (".git/config", None, "'.git' component"),
    (".env", b"API_TOKEN=sk-live-0123456789abcdef0123\n", "credentials"),
    (".env.local", b"PASSWORD=hunter22hunter22\n", "credentials"),
    ("id_rsa", b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n", "credentials"),
    ("deploy/server.pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n", "credentials"),
    (".ssh/config", b"Host *\n", "credentials directory"),
]


@pytest.mark.parametrize(("path", "content", "reason"), READ_ATTACKS)
def test_reading_secrets_and_metadata_is_refused(
    served: GatewayThread, repo: Path, path: str, content: bytes | None, reason: str
) -> None:
    target = repo / path
    if content is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    secret = target.read_bytes()
    for encoding in ("utf-8", "base64"):
        with pytest.raises(AccessDenied, match=reason):
            served.call("fs", "readFile", {"path": path, "encoding": encoding})
    # negative control: without the guard the same read hands the secret over
    got = served.call("unguarded", "readFile", {"path": path})
    assert base64.b64decode(got["content"]) == secret


def test_listing_skips_repository_metadata(served: GatewayThread, repo: Path) -> None:
    listed = [e["path"] for e in served.call("fs", "listFiles", {"recursive": True})["entries"]]
    assert listed == ["README.md"]
    with pytest.raises(AccessDenied):
        served.call("fs", "listFiles", {"path": ".git"})


# ------------------------------------------------------------------------- symlink swap

#: Swaps ``d`` (a directory in the root) with ``d-link`` (a symlink to outside the root),
#: atomically with renameat2(RENAME_EXCHANGE), as fast as it can until ``stop`` exists.
SWAPPER = textwrap.dedent(
    """
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    a, b, stop = (p.encode() for p in sys.argv[1:4])
    swaps = 0
    while not os.path.exists(stop):
        for _ in range(200):
            if libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) != 0:
                sys.exit("renameat2: " + os.strerror(ctypes.get_errno()))
            swaps += 1
    if swaps % 2:  # leave the directory where it was
        libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
    print(swaps)
    """
)
OUTSIDE_SECRET = b"OUTSIDE-SECRET\n"


def _have_renameat2() -> bool:
    return hasattr(ctypes.CDLL(None), "renameat2")


class Swapper:
    def __init__(self, repo: Path, outside: Path, tmp: Path) -> None:
        (repo / "d").mkdir()
        (repo / "d" / "f").write_bytes(b"inside\n")
        (repo / "d-link").symlink_to(outside)
        self.stop = tmp / "stop-swapping"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SWAPPER, str(repo / "d"), str(repo / "d-link"), str(self.stop)],
            stdout=subprocess.PIPE,
            text=True,
        )

    def finish(self) -> int:
        self.stop.touch()
        out, _ = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, out
        return int(out)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "f").write_bytes(OUTSIDE_SECRET)
    return d


@pytest.mark.skipif(not _have_renameat2(), reason="needs renameat2 (glibc 2.28+)")
def test_symlink_swap_never_leaves_the_root(
    served: GatewayThread, repo: Path, outside: Path, tmp_path: Path
) -> None:
    before = tree_digest(outside)
    swapper = Swapper(repo, outside, tmp_path)
    outcomes = {"read": 0, "written": 0, "symlink refused": 0}
    try:
        for i in range(400):
            try:
                if i % 2:
                    got = served.call("fs", "readFile", {"path": "d/f"})
                    assert got["content"].encode() != OUTSIDE_SECRET, "read outside the root"
                    outcomes["read"] += 1
                else:
                    served.call("fs", "writeFile", {"path": "d/f", "content": f"agent {i}\n"})
                    outcomes["written"] += 1
            except AccessDenied:  # ran into the link (the message says so: checked below)
                outcomes["symlink refused"] += 1
    finally:
        swaps = swapper.finish()
    assert tree_digest(outside) == before, "something outside the root changed"
    assert swaps > 1000, swaps
    with pytest.raises(AccessDenied, match="'d-link' is a symbolic link"):
        served.call("fs", "readFile", {"path": "d-link/f"})
    # the race really ran both ways: calls went through the directory and ran into the link
    assert outcomes["symlink refused"] > 0 and outcomes["read"] + outcomes["written"] > 0, outcomes


@pytest.mark.skipif(not _have_renameat2(), reason="needs renameat2 (glibc 2.28+)")
def test_negative_control_check_then_open_escapes(
    served: GatewayThread, repo: Path, outside: Path, tmp_path: Path
) -> None:
    before = tree_digest(outside)
    swapper = Swapper(repo, outside, tmp_path)
    escaped = False
    try:
        for i in range(3000):
            try:
                if i % 2:
                    got = served.call("unguarded", "readFile", {"path": "d/f"})
                    escaped = base64.b64decode(got["content"]) == OUTSIDE_SECRET
                else:
                    content = base64.b64encode(b"agent\n").decode()
                    served.call("unguarded", "writeFile", {"path": "d/f", "content": content})
                    escaped = tree_digest(outside) != before
            except GatewayError:
                continue  # the check caught the link this time
            if escaped:
                break
    finally:
        swapper.finish()
    assert escaped, "check-then-open should lose the race within 3000 calls"
