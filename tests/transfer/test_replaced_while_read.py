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


def _replace_when_opened(
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    options: dict[str, Any],
    opened: str,
    times: int,
    initial: int = 1,
) -> list[int]:
    """Each of the first ``times`` opens of the object whose path ends with ``opened`` is
    followed by another writer publishing the next version of ``url`` (``{"version": n}``,
    counting on from ``initial``); the versions written, for the test to see the race really
    happened."""
    write_small_atomic(url, b'{"version": %d}' % initial, options)
    real_open = s3fs.S3FileSystem._open
    versions: list[int] = []

    def open_then_replace(self: Any, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        handle = real_open(self, path, mode, **kwargs)
        if mode == "rb" and path.endswith(opened) and len(versions) < times:
            versions.append(len(versions) + 1)
            write_small_atomic(url, b'{"version": %d}' % (initial + versions[-1]), options)
        return handle

    monkeypatch.setattr(s3fs.S3FileSystem, "_open", open_then_replace)
    return versions


def test_a_document_replaced_between_open_and_read_is_read_again(
    s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "s3://narrative-test/replaced/index.json"
    replaced = _replace_when_opened(monkeypatch, url, s3_options, "replaced/index.json", 1)
    assert verified.read_small(url, s3_options) == b'{"version": 2}'
    assert replaced  # the race really happened


def test_a_document_replaced_under_the_reader_again_and_again_is_still_read(
    s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers that keep replacing the document for a second (four pushers on a loaded machine)
    do not make the read fail: it is retried for seconds, not for six attempts."""
    url = "s3://narrative-test/replaced-often/index.json"
    opened = "replaced-often/index.json"
    versions = _replace_when_opened(monkeypatch, url, s3_options, opened, 10, initial=0)
    assert verified.read_small(url, s3_options) == b'{"version": 10}'
    assert len(versions) == 10  # replaced under each of ten reads


def test_a_sidecar_replaced_between_open_and_read_is_read_again(
    s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The four-pusher race once failed a push here: the sidecar, not the document, was the
    object replaced under the reader (``[Errno 16] ... index.json``)."""
    url = "s3://narrative-test/replaced-sidecar/index.json"
    opened = "replaced-sidecar/index.json.sha256"
    replaced = _replace_when_opened(monkeypatch, url, s3_options, opened, 1)
    assert verified.read_small(url, s3_options) == b'{"version": 2}'
    assert replaced  # the race really happened
