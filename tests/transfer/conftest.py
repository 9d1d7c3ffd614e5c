"""Shared fixtures for transfer tests: real storage backends, no fakes.

* local directories (plain paths and ``file://`` URLs) under ``tmp_path``;
* ``memory://``, emptied before and after every test;
* S3 over HTTP: moto's ``ThreadedMotoServer`` on 127.0.0.1 (one per session, reset before
  every test) driven through s3fs. ``s3_options`` gives the storage options and ``s3_bucket``
  an empty bucket's URL, for any transfer test to reuse.

S3 tests skip when moto or s3fs is missing, unless ``NARRATIVE_REQUIRE_S3=1`` is set (CI), in
which case they fail (:mod:`tests.moto_support`).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec.core
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from tests.moto_support import moto_server, moto_unavailable, post, use_test_credentials

BUCKET = "narrative-test"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a moto S3 server running for the whole session."""
    try:
        import s3fs  # noqa: F401
    except ImportError as exc:
        moto_unavailable(f"S3 tests need moto[server] and s3fs: {exc}")
    yield from moto_server()


@pytest.fixture
def s3_options(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Storage options for the moto server, with bucket ``narrative-test`` created empty.

    No ``region_name``: with one, bucket creation fails on LocationConstraint.
    """
    import s3fs

    use_test_credentials(monkeypatch)
    post(f"{s3_endpoint}/moto-api/reset")
    # Cached instances keep listing caches (and sessions) from earlier tests.
    s3fs.S3FileSystem.clear_instance_cache()
    options: dict[str, Any] = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3_endpoint},
    }
    s3fs.S3FileSystem(**options).mkdir(BUCKET)
    yield options
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3_options: dict[str, Any]) -> str:
    """URL of the empty test bucket (use with ``s3_options``)."""
    return f"s3://{BUCKET}"


@pytest.fixture
def memory_root() -> Iterator[str]:
    """An empty ``memory://`` area; the in-process store is wiped before and after."""

    def wipe() -> None:
        MemoryFileSystem.store.clear()
        MemoryFileSystem.pseudo_dirs[:] = [""]

    wipe()
    yield "memory://narrative-test"
    wipe()


@dataclass
class Backend:
    """One storage backend under test: an empty base URL and its storage options."""

    name: str
    base: str
    options: dict[str, Any] = field(default_factory=dict)

    def url(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts)

    def fs(self) -> tuple[Any, str]:
        """The raw filesystem and base path, to inspect or tamper behind fsio's back."""
        fs, path = fsspec.core.url_to_fs(self.base, **self.options)
        fs.invalidate_cache()
        return fs, path

    def raw_write(self, rel: str, data: bytes) -> None:
        fs, path = self.fs()
        if self.name in ("local", "file"):
            fs.makedirs(posixpath.dirname(posixpath.join(path, rel)), exist_ok=True)
        fs.pipe_file(posixpath.join(path, rel), data)

    def raw_read(self, rel: str) -> bytes:
        fs, path = self.fs()
        return bytes(fs.cat_file(posixpath.join(path, rel)))

    def files(self) -> list[str]:
        """Every object below the base (hidden temp files, sidecars and locks included)."""
        fs, path = self.fs()
        if not fs.exists(path):
            return []
        return sorted(posixpath.relpath(p, path) for p in fs.find(path))


BACKENDS = [
    "local",
    "file",
    "memory",
    pytest.param("s3", marks=pytest.mark.heavy),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each real backend in turn, with an empty base directory or prefix."""
    name: str = request.param
    if name == "local":
        return Backend(name, str(tmp_path / "store"))
    if name == "file":
        return Backend(name, f"file://{tmp_path / 'store'}")
    if name == "memory":
        return Backend(name, request.getfixturevalue("memory_root") + "/store")
    options = request.getfixturevalue("s3_options")
    return Backend(name, f"s3://{BUCKET}/store", options)
