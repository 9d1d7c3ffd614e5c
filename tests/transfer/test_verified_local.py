"""Importing from a plain local path reads the artifact without fsspec
(:mod:`transfer.verified_local`), with the same verification and the same errors as the fsspec
reader (:func:`transfer.verified.open_verified`) gives for that file."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from narrative.snapshot import take_snapshot
from narrative.store import Store
from tests.conftest import call_in_own_process
from transfer.errors import ArtifactNotFound, ChecksumMismatch, InvalidArtifact, StorageError
from transfer.importer import import_
from transfer.verified_local import open_local_verified

_FAILURES = (ArtifactNotFound, ChecksumMismatch, InvalidArtifact, StorageError)


def _read_all(opener: Callable[[], Any]) -> tuple[str, bytes | str]:
    """("ok", content) or (error class, message) of reading an artifact to its end."""
    try:
        with opener() as f:
            return "ok", f.read()
    except _FAILURES as exc:
        return type(exc).__name__, str(exc)


def _publish(path: Path, data: bytes, sidecar: bytes | None) -> None:
    path.write_bytes(data)
    if sidecar is not None:
        Path(str(path) + ".sha256").write_bytes(sidecar)


@pytest.mark.parametrize(
    "case", ["ok", "mismatch", "no-sidecar", "no-data", "junk-sidecar", "huge-sidecar", "dir"]
)
def test_local_reader_agrees_with_the_fsspec_reader(tmp_path: Path, case: str) -> None:
    data = os.urandom(3 << 20)  # several reads
    good = f"{hashlib.sha256(data).hexdigest()}  a.bundle\n".encode()
    path = tmp_path / "a.bundle"
    if case == "ok":
        _publish(path, data, good)
    elif case == "mismatch":
        _publish(path, data[:-1] + b"x", good)
    elif case == "no-sidecar":
        _publish(path, data, None)
    elif case == "no-data":
        Path(str(path) + ".sha256").write_bytes(good)
    elif case == "junk-sidecar":
        _publish(path, data, b"not a digest\n")
    elif case == "huge-sidecar":
        _publish(path, data, good + b" " * 2000)
    else:
        path.mkdir()
        Path(str(path) + ".sha256").write_bytes(good)
    from transfer import verified

    url = str(path)
    ours = _read_all(lambda: open_local_verified(url, url))
    theirs = _read_all(lambda: verified.open_verified(url))
    assert ours[0] == theirs[0]
    assert (ours[0] == "ok") == (case == "ok")
    if case == "ok":
        assert ours[1] == data
    elif case != "dir":  # the OS error's wording differs between the two openers
        assert ours == theirs


def import_without_fsspec(ws: str, bundle: str) -> dict[str, Any]:
    """Run in a fresh interpreter: import ``bundle`` (a plain path) into the store of ``ws``
    (this module imports nothing that loads fsspec at its top)."""
    store = Store.open(workspace=ws)
    result = import_(store, bundle)
    return {"objects": result.objects, "fsspec": [m for m in sys.modules if m.startswith("fsspec")]}


def test_import_of_a_plain_path_loads_no_fsspec_and_still_verifies(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    from transfer.exporter import export

    (workspace / "f.txt").write_text("content\n")
    take_snapshot(store)
    bundle = tmp_path / "x.bundle"
    export(store, str(bundle))
    data = bundle.read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    Store.init(str(other))
    got = call_in_own_process(
        "tests.transfer.test_verified_local:import_without_fsspec", str(other), str(bundle)
    )
    assert got["objects"] >= 3
    assert got["fsspec"] == []
    # a bundle that does not match its sidecar is refused and changes nothing
    bundle.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    (tmp_path / "third").mkdir()
    third = Store.init(str(tmp_path / "third"))
    before = sorted(os.listdir(third.odb.pack_dir)) if os.path.isdir(third.odb.pack_dir) else []
    with pytest.raises(ChecksumMismatch):
        import_(third, str(bundle))
    after = sorted(os.listdir(third.odb.pack_dir)) if os.path.isdir(third.odb.pack_dir) else []
    assert after == before
