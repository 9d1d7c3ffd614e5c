"""A small document replaced while it is being read (another pusher publishing the remote's
index at that moment) is read again, not reported as an error: s3fs checks the object's ETag
on every read and fails with EBUSY when it changed since the file was opened (seen in the
four-pusher race under load), for the document and for its checksum sidecar alike."""

from __future__ import annotations

from typing import Any

import pytest
import s3fs

from transfer import verified
from transfer.publishing import write_small_atomic


def test_a_document_replaced_between_open_and_read_is_read_again(
    s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "s3://narrative-test/replaced/index.json"
    write_small_atomic(url, b'{"version": 1}', s3_options)
    real_open = s3fs.S3FileSystem._open
    replaced: list[str] = []

    def open_then_replace(self: Any, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        handle = real_open(self, path, mode, **kwargs)
        if mode == "rb" and path.endswith("index.json") and not replaced:
            # another writer publishes the next version after this reader opened the file
            replaced.append(path)
            write_small_atomic(url, b'{"version": 2}', s3_options)
        return handle

    monkeypatch.setattr(s3fs.S3FileSystem, "_open", open_then_replace)
    assert verified.read_small(url, s3_options) == b'{"version": 2}'
    assert replaced  # the race really happened


def test_a_document_replaced_under_the_reader_again_and_again_is_still_read(
    s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers that keep replacing the document for a second (four pushers on a loaded machine)
    do not make the read fail: it is retried for seconds, not for six attempts."""
    url = "s3://narrative-test/replaced-often/index.json"
    write_small_atomic(url, b'{"version": 0}', s3_options)
    real_open = s3fs.S3FileSystem._open
    versions: list[int] = []

    def open_then_replace(self: Any, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        handle = real_open(self, path, mode, **kwargs)
        if mode == "rb" and path.endswith("replaced-often/index.json") and len(versions) < 10:
            versions.append(len(versions) + 1)
            write_small_atomic(url, b'{"version": %d}' % versions[-1], s3_options)
        return handle

    monkeypatch.setattr(s3fs.S3FileSystem, "_open", open_then_replace)
    assert verified.read_small(url, s3_options) == b'{"version": 10}'
    assert len(versions) == 10  # replaced under each of ten reads


def test_a_sidecar_replaced_between_open_and_read_is_read_again(
    s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The four-pusher race once failed a push here: the sidecar, not the document, was the
    object replaced under the reader (``[Errno 16] ... index.json``)."""
    url = "s3://narrative-test/replaced-sidecar/index.json"
    write_small_atomic(url, b'{"version": 1}', s3_options)
    real_open = s3fs.S3FileSystem._open
    replaced: list[str] = []

    def open_then_replace(self: Any, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        handle = real_open(self, path, mode, **kwargs)
        if mode == "rb" and path.endswith("replaced-sidecar/index.json.sha256") and not replaced:
            replaced.append(path)
            write_small_atomic(url, b'{"version": 2}', s3_options)
        return handle

    monkeypatch.setattr(s3fs.S3FileSystem, "_open", open_then_replace)
    assert verified.read_small(url, s3_options) == b'{"version": 2}'
    assert replaced  # the race really happened
