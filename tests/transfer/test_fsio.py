"""transfer.fsio against real backends: local files, file://, memory:// and S3 (moto server)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from fsspec.callbacks import Callback

from narrative.errors import InvalidInput, NarrativeError
from tests.conftest import call_in_own_process
from tests.transfer.conftest import BUCKET, Backend
from transfer import fsio, publishing, storage_lock, storage_options, verified
from transfer.errors import (
    ArtifactNotFound,
    ChecksumMismatch,
    InvalidArtifact,
    StorageError,
    StorageLockTimeout,
    TransferError,
)

MiB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chunks(count: int, size: int = MiB) -> list[bytes]:
    return [bytes([i % 251]) * 16 + os.urandom(16) + b"\0" * (size - 32) for i in range(count)]


# --------------------------------------------------------------------------- round trips


def test_round_trip(backend: Backend) -> None:
    url = backend.url("dir", "a.bundle")
    parts: list[bytes | bytearray | memoryview] = [
        b"hello ",
        bytearray(b"streamed "),
        memoryview(b"world"),
    ]
    cb = Callback()
    with publishing.publish(url, backend.options, callback=cb, size=20) as out:
        for part in parts:
            assert out.write(part) == len(part)
    data = b"hello streamed world"
    assert (out.sha256, out.size, out.published) == (sha(data), len(data), True)
    assert (cb.size, cb.value) == (20, len(data))

    assert verified.exists(url, backend.options)
    assert verified.list_dir(backend.url("dir"), backend.options) == ["a.bundle"]
    assert backend.files() == ["dir/a.bundle", "dir/a.bundle.sha256"]
    assert backend.raw_read("dir/a.bundle.sha256") == f"{sha(data)}  a.bundle\n".encode()
    assert verified.read_small(url, backend.options) == data
    assert verified.verify(url, backend.options) == sha(data)

    read_cb = Callback()
    with verified.open_verified(url, backend.options, callback=read_cb) as f:
        got = b"".join(iter(lambda: f.read(4), b""))
        assert f.verified and f.sha256 == sha(data)
    assert got == data
    assert (read_cb.size, read_cb.value) == (len(data), len(data))

    publishing.remove(url, backend.options)
    assert not verified.exists(url, backend.options)
    assert verified.list_dir(backend.url("dir"), backend.options) == []
    assert backend.files() == []
    with pytest.raises(ArtifactNotFound):
        publishing.remove(url, backend.options)
    publishing.remove(url, backend.options, missing_ok=True)


def test_overwrite_and_small_documents(backend: Backend) -> None:
    url = backend.url("index.json")
    publishing.write_small_atomic(url, b'{"v": 1}', backend.options)
    publishing.write_small_atomic(url, b'{"v": 2}', backend.options)
    assert verified.read_small(url, backend.options) == b'{"v": 2}'
    assert backend.files() == ["index.json", "index.json.sha256"]

    with pytest.raises(InvalidArtifact, match="limit"):
        verified.read_small(url, backend.options, limit=4)


def test_empty_artifact(backend: Backend) -> None:
    url = backend.url("empty")
    with publishing.publish(url, backend.options):
        pass
    assert verified.read_small(url, backend.options) == b""
    assert verified.verify(url, backend.options) == sha(b"")


def test_list_dir_shows_only_published(backend: Backend) -> None:
    publishing.write_small_atomic(backend.url("b"), b"2", backend.options)
    publishing.write_small_atomic(backend.url("a"), b"1", backend.options)
    publishing.write_small_atomic(backend.url("sub", "c"), b"3", backend.options)
    backend.raw_write("unpublished", b"x")
    backend.raw_write(".a.0123.tmp", b"x")
    assert verified.list_dir(backend.base, backend.options) == ["a", "b"]
    assert verified.list_dir(backend.url("nothing-here"), backend.options) == []


def test_writer_closed_early_still_publishes(backend: Backend) -> None:
    # Compressors close their output stream; publishing happens at the end of the block.
    url = backend.url("x")
    with publishing.publish(url, backend.options) as out:
        out.write(b"abc")
        out.close()
        with pytest.raises(ValueError):
            out.write(b"more")
    assert verified.read_small(url, backend.options) == b"abc"


# --------------------------------------------------------------------------- streaming


def _stream_and_measure(url: str, options: dict[str, Any], total_mib: int) -> tuple[int, int]:
    parts = chunks(4)
    expected = hashlib.sha256()
    verified.exists(url, options)  # set the client up first: botocore's models alone take ~20 MiB
    tracemalloc.start()
    try:
        with publishing.publish(url, options) as out:
            for i in range(total_mib):
                out.write(parts[i % 4])
                expected.update(parts[i % 4])
        write_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        assert out.sha256 == expected.hexdigest()
        assert out.size == total_mib * MiB
        assert verified.verify(url, options) == expected.hexdigest()
        read_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return write_peak, read_peak


def _measure_in_own_process(url: str, options: dict[str, Any]) -> tuple[int, int]:
    write_peak, read_peak = call_in_own_process(
        "tests.transfer.test_fsio:_stream_and_measure", url, options, 50
    )
    return int(write_peak), int(read_peak)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "file"])
def test_streaming_50mb_bounded_memory(kind: str, tmp_path: Path) -> None:
    url = str(tmp_path / "big.bin") if kind == "local" else f"file://{tmp_path}/big.bin"
    write_peak, read_peak = _measure_in_own_process(url, {})
    assert write_peak < 4 * MiB, write_peak
    assert read_peak < 4 * MiB, read_peak
    assert (tmp_path / "big.bin").stat().st_size == 50 * MiB


@pytest.mark.slow
@pytest.mark.heavy
def test_streaming_50mb_s3_multipart(s3_bucket: str, s3_options: dict[str, Any]) -> None:
    write_peak, read_peak = _measure_in_own_process(f"{s3_bucket}/big.bin", s3_options)
    # Bounded by the 8 MiB part / read-ahead block (the buffer, the part being sent and the
    # block being received), not by the payload: the same figures come out for 20 MiB.
    assert write_peak < 32 * MiB, write_peak
    assert read_peak < 32 * MiB, read_peak


# --------------------------------------------------------------------------- atomicity


def test_exception_leaves_nothing(backend: Backend) -> None:
    url = backend.url("d", "partial.bin")
    with pytest.raises(RuntimeError, match="boom"), publishing.publish(url, backend.options) as out:
        out.write(b"x" * 1000)
        raise RuntimeError("boom")
    assert not verified.exists(url, backend.options)
    assert [f for f in backend.files() if not f.endswith("/")] == []


@pytest.mark.heavy
def test_exception_after_multipart_upload_started_leaves_nothing(
    s3_bucket: str, s3_options: dict[str, Any]
) -> None:
    import s3fs

    url = f"{s3_bucket}/partial.bin"
    with pytest.raises(RuntimeError), publishing.publish(url, s3_options) as out:
        for part in chunks(10):  # > one 8 MiB part: a multipart upload is in flight
            out.write(part)
        raise RuntimeError("boom")
    fs = s3fs.S3FileSystem(**s3_options)
    fs.invalidate_cache()
    assert fs.find(BUCKET) == []
    assert fs.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads", []) == []


def test_failed_overwrite_keeps_old_version(backend: Backend) -> None:
    url = backend.url("keep")
    publishing.write_small_atomic(url, b"old", backend.options)
    with pytest.raises(KeyError), publishing.publish(url, backend.options) as out:
        out.write(b"new new new")
        raise KeyError("interrupted")
    assert verified.read_small(url, backend.options) == b"old"
    assert backend.files() == ["keep", "keep.sha256"]


@pytest.mark.parametrize("kind", ["local", "file"])
def test_local_readers_never_see_a_partial_file(kind: str, tmp_path: Path) -> None:
    final = tmp_path / "out" / "artifact.tar.zst"
    url = str(final) if kind == "local" else f"file://{final}"
    with publishing.publish(url) as out:
        for part in chunks(3):
            out.write(part)
            assert not final.exists()
            assert not verified.exists(url)
            assert verified.list_dir(str(final.parent)) == []
            hidden = os.listdir(final.parent)
            assert len(hidden) == 1 and hidden[0].startswith(".artifact.tar.zst.")
    assert final.stat().st_size == 3 * MiB
    assert sorted(os.listdir(final.parent)) == ["artifact.tar.zst", "artifact.tar.zst.sha256"]


def test_sidecar_is_sha256sum_format(tmp_path: Path) -> None:
    publishing.write_small_atomic(str(tmp_path / "doc.json"), b"{}")
    proc = subprocess.run(
        ["sha256sum", "-c", "doc.json.sha256"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- verification


def test_tampered_data_is_detected(backend: Backend) -> None:
    url = backend.url("t.bin")
    publishing.write_small_atomic(url, b"original content", backend.options)
    backend.raw_write("t.bin", b"tampered content")  # same length, different bytes

    with pytest.raises(ChecksumMismatch) as info:
        verified.verify(url, backend.options)
    assert info.value.expected == sha(b"original content")
    assert info.value.actual == sha(b"tampered content")
    assert isinstance(info.value, TransferError) and isinstance(info.value, NarrativeError)

    with verified.open_verified(url, backend.options) as f, pytest.raises(ChecksumMismatch):
        f.read()
    with pytest.raises(ChecksumMismatch):
        verified.read_small(url, backend.options)

    # Stopping exactly at the end without reading past it is checked on close.
    f = verified.open_verified(url, backend.options)
    f.read(4)
    with pytest.raises(ChecksumMismatch):
        f.read(len(b"tampered content") - 4)
    f.close()


def test_truncated_data_is_detected_on_read(backend: Backend) -> None:
    url = backend.url("t.bin")
    publishing.write_small_atomic(url, b"0123456789", backend.options)
    backend.raw_write("t.bin", b"01234")
    with verified.open_verified(url, backend.options) as f, pytest.raises(ChecksumMismatch):
        while f.read(3):
            pass


def test_missing_sidecar_means_not_found(backend: Backend) -> None:
    backend.raw_write("orphan.bin", b"data without sidecar")
    url = backend.url("orphan.bin")
    assert not verified.exists(url, backend.options)
    with pytest.raises(ArtifactNotFound, match="missing or unpublished") as info:
        verified.open_verified(url, backend.options)
    assert isinstance(info.value, LookupError)
    with pytest.raises(ArtifactNotFound):
        verified.read_small(url, backend.options)
    with pytest.raises(ArtifactNotFound):
        verified.verify(backend.url("never-written"), backend.options)


def test_sidecar_without_data_is_not_found(backend: Backend) -> None:
    backend.raw_write("ghost.bin.sha256", f"{sha(b'')}  ghost.bin\n".encode())
    url = backend.url("ghost.bin")
    assert not verified.exists(url, backend.options)
    with pytest.raises(ArtifactNotFound):
        verified.open_verified(url, backend.options)


@pytest.mark.parametrize(
    "sidecar",
    [b"", b"not a digest\n", b"\xff\xfe" * 40, b"a" * 63 + b"\n", b"0" * 64 + b" " * 2000],
    ids=["empty", "words", "binary", "short", "oversized"],
)
def test_hostile_sidecar_is_invalid_artifact(tmp_path: Path, sidecar: bytes) -> None:
    (tmp_path / "x").write_bytes(b"data")
    (tmp_path / "x.sha256").write_bytes(sidecar)
    with pytest.raises(InvalidArtifact):
        verified.open_verified(str(tmp_path / "x"))
    with pytest.raises(InvalidArtifact):
        verified.read_small(str(tmp_path / "x"))


def test_oversized_small_document_refused(memory_root: str) -> None:
    url = f"{memory_root}/big.json"
    publishing.write_small_atomic(url, b"x" * 2000)
    with pytest.raises(InvalidArtifact, match="2000 bytes"):
        verified.read_small(url, limit=1000)


def test_reserved_and_directory_names_rejected(tmp_path: Path) -> None:
    for name in ("x.sha256", "x.lock"):
        with (
            pytest.raises(InvalidInput, match="reserved"),
            publishing.publish(str(tmp_path / name)),
        ):
            pass
    assert os.listdir(tmp_path) == []
    with pytest.raises(InvalidInput, match="directory"):
        publishing.write_small_atomic("memory://", b"")


def test_publishing_over_a_directory_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "inside").write_bytes(b"keep")
    with pytest.raises(StorageError):
        publishing.write_small_atomic(str(tmp_path / "d"), b"x")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d", "inside"]


# --------------------------------------------------------------------------- errors


def test_resolve_bad_urls() -> None:
    with pytest.raises(InvalidInput):
        fsio.resolve("")
    with pytest.raises(InvalidInput, match="nosuchproto"):
        fsio.resolve("nosuchproto://x/y")
    fs, path = fsio.resolve("memory://a/b")
    assert path == "/a/b" and "memory" in fs.protocol


def test_local_io_errors_become_storage_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError) as info, publishing.publish(str(tmp_path / "file" / "x")):
        pass
    assert str(tmp_path / "file" / "x") in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.heavy
def test_s3_errors_become_transfer_errors(s3_options: dict[str, Any]) -> None:
    with pytest.raises(StorageError, match="no such bucket"):
        publishing.write_small_atomic("s3://no-such-bucket-here/x", b"1", s3_options)
    with pytest.raises(ArtifactNotFound):
        verified.read_small("s3://no-such-bucket-here/x", s3_options)
    dead = {**s3_options, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    dead["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 1}
    with pytest.raises(StorageError, match=r"127\.0\.0\.1:9") as info:
        verified.exists(f"s3://{BUCKET}/x", dead)  # not "absent": fsspec's exists() would say so
    assert "testing" not in str(info.value)


def test_credentials_in_urls_are_redacted() -> None:
    assert fsio.redact("s3://AKIA:hunter2@bucket/k") == "s3://***@bucket/k"
    assert fsio.redact("simplecache::ftp://u:p@host/x") == "simplecache::ftp://***@host/x"


# --------------------------------------------------------------------------- storage options


def test_parse_storage_options() -> None:
    opts = storage_options.parse_storage_options(
        [
            "anon=false",
            "key=AKIA",
            "secret=s3cr3t=with=equals",
            "default_block_size=5242880",
            "client_kwargs.endpoint_url=http://127.0.0.1:9000",
            "client_kwargs.verify=false",
            'config_kwargs={"retries": {"max_attempts": 2}}',
            "config_kwargs.connect_timeout=1.5",
            'quoted="123"',
            "empty=",
            "n=null",
        ]
    )
    assert opts == {
        "anon": False,
        "key": "AKIA",
        "secret": "s3cr3t=with=equals",
        "default_block_size": 5242880,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "verify": False},
        "config_kwargs": {"retries": {"max_attempts": 2}, "connect_timeout": 1.5},
        "quoted": "123",
        "empty": "",
        "n": None,
    }
    assert storage_options.parse_storage_options(["a=1", "a=2"]) == {"a": 2}
    assert storage_options.parse_storage_options([]) == {}


@pytest.mark.parametrize(
    ("pairs", "match"),
    [
        (["novalue"], "not KEY=VALUE"),
        (["=1"], "must be dot-separated"),
        (["a..b=1"], "must be dot-separated"),
        (["a.=1"], "must be dot-separated"),
        (["bad key=1"], "must be dot-separated"),
        (["a=1", "a.b=2"], "already set"),
        ([b"a=1"], "KEY=VALUE string"),
    ],
)
def test_parse_storage_options_rejects(pairs: list[Any], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        storage_options.parse_storage_options(pairs)


def test_storage_options_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NARRATIVE_STORAGE_KEY", "AKIA")
    monkeypatch.setenv("NARRATIVE_STORAGE_ANON", "false")
    monkeypatch.setenv("NARRATIVE_STORAGE_CLIENT_KWARGS__ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("NARRATIVE_STORAGE_CONFIG_KWARGS__RETRIES__MAX_ATTEMPTS", "3")
    monkeypatch.setenv("NARRATIVE_STORE", "/elsewhere")  # a different prefix
    assert storage_options.storage_options_from_env() == {
        "key": "AKIA",
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:1"},
        "config_kwargs": {"retries": {"max_attempts": 3}},
    }
    assert storage_options.storage_options_from_env("OTHER_", environ={"OTHER_X": "1"}) == {"x": 1}
    assert storage_options.storage_options_from_env(environ={}) == {}


@pytest.mark.parametrize(
    "env",
    [
        {"NARRATIVE_STORAGE_": "1"},
        {"NARRATIVE_STORAGE_A____B": "1"},
        {"NARRATIVE_STORAGE_A": "1", "NARRATIVE_STORAGE_A__B": "2"},
    ],
)
def test_storage_options_from_env_rejects(env: dict[str, str]) -> None:
    with pytest.raises(InvalidInput, match="NARRATIVE_STORAGE_"):
        storage_options.storage_options_from_env(environ=env)


def test_merge_storage_options() -> None:
    base = {"key": "env", "client_kwargs": {"endpoint_url": "http://a", "verify": True}}
    over = {"client_kwargs": {"endpoint_url": "http://b"}, "anon": False}
    assert storage_options.merge_storage_options(base, over) == {
        "key": "env",
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://b", "verify": True},
    }
    assert base["client_kwargs"] == {"endpoint_url": "http://a", "verify": True}


# --------------------------------------------------------------------------- compare-and-swap


def test_compare_and_swap_semantics(backend: Backend) -> None:
    url = backend.url("refs", "index.json")
    opts = backend.options
    assert publishing.compare_and_swap_small(url, None, b"v1", opts)
    assert not publishing.compare_and_swap_small(url, None, b"again", opts)
    assert not publishing.compare_and_swap_small(url, sha(b"something else"), b"v2", opts)
    assert verified.read_small(url, opts) == b"v1"
    assert publishing.compare_and_swap_small(url, sha(b"v1").upper(), b"v2", opts)
    assert verified.read_small(url, opts) == b"v2"
    assert backend.files() == ["refs/index.json", "refs/index.json.sha256"]  # lock released

    with pytest.raises(InvalidInput):
        publishing.compare_and_swap_small(url, "abc", b"v3", opts)
    with pytest.raises(InvalidInput):
        publishing.compare_and_swap_small(url, sha(b"v2"), "text", opts)  # type: ignore[arg-type]


def test_compare_and_swap_over_unpublished_leftover(backend: Backend) -> None:
    backend.raw_write("doc", b"debris of a crashed write")
    url = backend.url("doc")
    assert publishing.compare_and_swap_small(url, None, b"fresh", backend.options)
    assert verified.read_small(url, backend.options) == b"fresh"


def test_compare_and_swap_refuses_corrupt_current(backend: Backend) -> None:
    url = backend.url("doc")
    publishing.write_small_atomic(url, b"good", backend.options)
    backend.raw_write("doc", b"evil")
    with pytest.raises(ChecksumMismatch):
        publishing.compare_and_swap_small(url, sha(b"good"), b"new", backend.options)
    assert backend.raw_read("doc") == b"evil"


def _race_round(url: str, options: dict[str, Any], expected: str | None, rnd: int) -> int:
    """Two threads try the same swap at the same moment; return the winner's index."""
    barrier = threading.Barrier(2)
    results: dict[int, bool] = {}
    errors: list[BaseException] = []

    def contender(i: int) -> None:
        try:
            barrier.wait()
            data = f"round {rnd} by {i}".encode()
            results[i] = publishing.compare_and_swap_small(url, expected, data, options)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    winners = [i for i, won in results.items() if won]
    assert len(results) == 2 and len(winners) == 1, (rnd, results)
    return winners[0]


def _race(url: str, options: dict[str, Any], rounds: int) -> None:
    expected: str | None = None  # round 0 races to create the document
    for rnd in range(rounds):
        winner = _race_round(url, options, expected, rnd)
        current = verified.read_small(url, options)
        assert current == f"round {rnd} by {winner}".encode()
        expected = sha(current)


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_compare_and_swap_race(kind: str, tmp_path: Path, memory_root: str) -> None:
    base = str(tmp_path) if kind == "local" else memory_root
    _race(f"{base}/index.json", {}, rounds=8)
    if kind == "local":
        assert sorted(os.listdir(tmp_path)) == ["index.json", "index.json.sha256"]


@pytest.mark.heavy
def test_compare_and_swap_race_s3(s3_bucket: str, s3_options: dict[str, Any]) -> None:
    _race(f"{s3_bucket}/remote/index.json", s3_options, rounds=6)
    assert verified.list_dir(f"{s3_bucket}/remote", s3_options) == ["index.json"]
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    fs.invalidate_cache()
    assert sorted(fs.find(BUCKET)) == [
        f"{BUCKET}/remote/index.json",
        f"{BUCKET}/remote/index.json.sha256",
    ]


@pytest.mark.heavy
def test_s3_conditional_put_is_the_fence(s3_bucket: str, s3_options: dict[str, Any]) -> None:
    # What the guarantee rests on: the server rejects If-Match with a stale ETag and
    # If-None-Match: * on an existing key, and fsio reads those refusals as "lost".
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    path = f"{BUCKET}/fence"
    fs.pipe_file(path, b"one", IfNoneMatch="*")
    with pytest.raises(Exception) as created:
        fs.pipe_file(path, b"two", IfNoneMatch="*")
    assert fsio.precondition_failed(created.value)
    etag = fs.info(path)["ETag"]
    fs.pipe_file(path, b"three", IfMatch=etag)
    with pytest.raises(Exception) as stale:
        fs.pipe_file(path, b"four", IfMatch=etag)
    assert fsio.precondition_failed(stale.value)
    assert fs.cat_file(path) == b"three"


@pytest.mark.heavy
@pytest.mark.parametrize("existing", [b"v1", None])
def test_s3_swap_is_fenced_even_if_the_lock_is_lost(
    s3_bucket: str,
    s3_options: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    existing: bytes | None,
) -> None:
    # A writer that ignores (or broke) the lock changes the document between the swap's read
    # and its write: the conditional PUT must refuse, and the intruder's bytes must survive.
    url = f"{s3_bucket}/doc"
    if existing is not None:
        publishing.write_small_atomic(url, existing, s3_options)
    real_current = publishing.current_version

    def read_then_intrude(fs: Any, path: str, url_: str) -> tuple[str | None, str | None]:
        state = real_current(fs, path, url_)
        fs.pipe_file(path, b"intruder")
        return state

    monkeypatch.setattr(publishing, "current_version", read_then_intrude)
    expected = None if existing is None else sha(existing)
    assert not publishing.compare_and_swap_small(url, expected, b"mine", s3_options)
    monkeypatch.undo()
    fs, path = fsio.resolve(url, s3_options)
    fs.invalidate_cache()
    assert fs.cat_file(path) == b"intruder"
    assert not fs.exists(path + ".lock")


def test_lock_held_times_out(backend: Backend) -> None:
    backend.raw_write("doc.lock", b'{"token": "someone", "created": %f}' % time.time())
    start = time.monotonic()
    with pytest.raises(StorageLockTimeout) as info:
        publishing.compare_and_swap_small(
            backend.url("doc"), None, b"x", backend.options, timeout=0.3
        )
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - start < 5
    assert backend.raw_read("doc.lock").startswith(b'{"token": "someone"')


def test_stale_lock_is_broken(backend: Backend) -> None:
    old = time.time() - storage_lock.STALE_LOCK_SECONDS - 5
    backend.raw_write("doc.lock", b'{"token": "crashed", "created": %f}' % old)
    if backend.name in ("local", "file"):
        _, base = backend.fs()
        os.utime(os.path.join(base, "doc.lock"), (old, old))
    assert publishing.compare_and_swap_small(
        backend.url("doc"), None, b"x", backend.options, timeout=5
    )
    assert backend.files() == ["doc", "doc.sha256"]


# --------------------------------------------------------------------------- chained URLs


@pytest.mark.heavy
def test_chained_simplecache_s3(s3_bucket: str, s3_options: dict[str, Any], tmp_path: Path) -> None:
    data = b"cached bundle bytes" * 1000
    publishing.write_small_atomic(f"{s3_bucket}/c/x.bundle", data, s3_options)

    url = f"simplecache::{s3_bucket}/c/x.bundle"
    opts = {"s3": s3_options, "cache_storage": str(tmp_path / "cache")}
    assert verified.exists(url, opts)
    assert verified.verify(url, opts) == sha(data)
    with verified.open_verified(url, opts) as f:
        assert f.read() == data
    assert verified.read_small(url, opts) == data
    assert any((tmp_path / "cache").iterdir())  # served through the local cache

    # Flat options work too: what the cache layer does not take goes to the s3 layer.
    flat = {**s3_options, "cache_storage": str(tmp_path / "cache2")}
    assert verified.read_small(url, flat) == data
    assert any((tmp_path / "cache2").iterdir())

    # Writes go through to the bucket, never only into the cache.
    publishing.write_small_atomic(f"simplecache::{s3_bucket}/c/y", b"written", opts)
    assert verified.read_small(f"{s3_bucket}/c/y", s3_options) == b"written"
    assert publishing.compare_and_swap_small(
        f"simplecache::{s3_bucket}/c/y", sha(b"written"), b"2", opts
    )
    assert verified.read_small(f"{s3_bucket}/c/y", s3_options) == b"2"
    assert verified.list_dir(f"{s3_bucket}/c", s3_options) == ["x.bundle", "y"]


def test_chained_simplecache_local(tmp_path: Path) -> None:
    publishing.write_small_atomic(str(tmp_path / "a"), b"local")
    opts = {"cache_storage": str(tmp_path / "cache")}
    assert verified.read_small(f"simplecache::file://{tmp_path}/a", opts) == b"local"
