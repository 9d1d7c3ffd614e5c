"""The compressed streams of archives, both ways. Writing: gzip is compressed in independent
512 KiB pieces on a few threads (pigz style: each piece primed with the 32 KiB before it, joined
by sync flushes into one deflate stream; pieces whose samples do not compress are stored), zstd
uses libzstd's own worker threads, and the output depends only on the content and the level.
Reading: the compression is sniffed from magic bytes, zstd frames are followed so that a stream
cut short is told from a complete one, and decompressed bytes are counted against a limit, so a
decompression bomb stops early.
"""

from __future__ import annotations

import contextlib
import gzip
import struct
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, BinaryIO, cast

import zstandard

from .archive import CHUNK, ArchiveError
from .errors import TransferError

__all__ = [
    "CountingWriter",
    "GzipSink",
    "LimitExceeded",
    "Limited",
    "ZstdFrames",
    "ZstdSink",
    "decompressor",
    "read_exact",
]


_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_PIECE = 512 << 10
_GZIP_WINDOW = 32 << 10
_MAX_GZIP_WORKERS = 4


class CountingWriter:
    """Counts the compressed bytes going to the caller's stream."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.count = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._out.write(data)
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        pass  # the caller owns the stream and decides when to flush it


def _incompressible(piece: bytes) -> bool:
    """Whether samples of ``piece`` do not deflate (then it is stored, at memcpy speed)."""
    if len(piece) < 64 << 10:
        return False
    sample = 4096
    for start in (0, len(piece) // 2, len(piece) - sample):
        if len(zlib.compress(piece[start : start + sample], 1)) < sample * 0.94:
            return False
    return True


def _deflate_piece(piece: bytes, window: bytes, level: int) -> tuple[bytes, bytes]:
    """Raw deflate of one piece, primed with the preceding window, ending on a sync flush so
    pieces concatenate into one valid stream (never final: the writer ends the stream)."""
    if level > 0 and _incompressible(piece):
        level = 0
    if level > 0 and window:
        comp = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, window)
    else:
        comp = zlib.compressobj(level, zlib.DEFLATED, -15, 8)
    return comp.compress(piece), comp.flush(zlib.Z_SYNC_FLUSH)


class GzipSink:
    """A gzip member compressed in parallel pieces; output depends only on data and level."""

    def __init__(self, out: CountingWriter, level: int, workers: int) -> None:
        workers = min(workers, _MAX_GZIP_WORKERS)
        self._out = out
        self._level = level
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="archive-gz")
        self._pending: deque[Future[tuple[bytes, bytes]]] = deque()
        # pieces in flight (each holds its input and output): bounds memory at a few MiB
        self._max_pending = workers + 1
        self._buf = bytearray()
        self._window = b""
        self._crc = 0
        self._size = 0
        # magic, deflate, no flags, mtime 0, no extra flags, OS unknown: no name, no time
        out.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")

    def write(self, data: bytes | memoryview) -> None:
        self._buf += data
        if len(self._buf) >= _GZIP_PIECE:
            view = memoryview(self._buf)
            pos = 0
            while len(self._buf) - pos >= _GZIP_PIECE:
                self._submit(bytes(view[pos : pos + _GZIP_PIECE]))
                pos += _GZIP_PIECE
            view.release()
            del self._buf[:pos]

    def _submit(self, piece: bytes) -> None:
        self._crc = zlib.crc32(piece, self._crc)
        self._size += len(piece)
        window, self._window = self._window, piece[-_GZIP_WINDOW:]
        self._pending.append(self._pool.submit(_deflate_piece, piece, window, self._level))
        while len(self._pending) > self._max_pending:
            self._write_next()

    def _write_next(self) -> None:
        for part in self._pending.popleft().result():
            self._out.write(part)

    def close(self) -> None:
        if self._buf:
            self._submit(bytes(self._buf))
            self._buf.clear()
        while self._pending:
            self._write_next()
        self._pool.shutdown()
        self._out.write(zlib.compressobj(self._level, zlib.DEFLATED, -15).flush())
        self._out.write(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))

    def abort(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pool.shutdown()


class ZstdSink:
    """One zstd frame with a content checksum, compressed by libzstd's worker threads."""

    def __init__(self, out: CountingWriter, level: int, workers: int) -> None:
        cctx = zstandard.ZstdCompressor(level=level, threads=workers, write_checksum=True)
        self._writer: Any = cctx.stream_writer(
            cast("IO[bytes]", out), closefd=False, write_return_read=True
        )

    def write(self, data: bytes | memoryview) -> None:
        self._writer.write(data)

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()


class LimitExceeded(TransferError):
    """The decompressed stream went past what the manifest allows."""


class _Prefixed:
    """A stream with the magic bytes already read put back in front."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self._head = head
        self._stream = stream

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n is None or n < 0 or n >= len(self._head):
                head, self._head = self._head, b""
                rest = self._stream.read(-1 if n is None or n < 0 else n - len(head))
                return head + rest
            head, self._head = self._head[:n], self._head[n:]
            return head
        return self._stream.read(n)


class ZstdFrames:
    """Follows the zstd frame layout of the raw input (headers only), so a stream cut short
    is told from a complete one: libzstd's streaming reader ends silently on truncation."""

    def __init__(self) -> None:
        self._state = "magic"
        self._need = 4
        self._buf = bytearray()
        self._skip = 0
        self._after = "magic"
        self._checksum = False
        self.frames = 0

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                take = min(self._skip, end - pos)
                self._skip -= take
                pos += take
                if not self._skip:
                    self._goto(self._after)
                continue
            take = min(self._need - len(self._buf), end - pos)
            self._buf += data[pos : pos + take]
            pos += take
            if len(self._buf) == self._need:
                field = bytes(self._buf)
                self._buf.clear()
                self._step(field)

    def _goto(self, state: str) -> None:
        self._state = state
        self._need = {"magic": 4, "skipsize": 4, "fhd": 1, "block": 3}[state]

    def _then(self, skip: int, state: str) -> None:
        if skip:
            self._skip, self._after = skip, state
        else:
            self._goto(state)

    def _step(self, field: bytes) -> None:
        if self._state == "magic":
            magic = int.from_bytes(field, "little")
            if field == _ZSTD_MAGIC:
                self._goto("fhd")
            elif 0x184D2A50 <= magic <= 0x184D2A5F:
                self._goto("skipsize")
            else:
                raise ArchiveError("archive is corrupt: bad zstd frame magic")
        elif self._state == "skipsize":
            self._then(int.from_bytes(field, "little"), "magic")
        elif self._state == "fhd":
            fhd = field[0]
            if fhd & 0x08:
                raise ArchiveError("archive is corrupt: bad zstd frame header")
            single = (fhd >> 5) & 1
            self._checksum = bool(fhd & 0x04)
            fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
            self._then((0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs, "block")
        else:
            header = int.from_bytes(field, "little")
            last, kind, size = header & 1, (header >> 1) & 3, header >> 3
            if kind == 3:
                raise ArchiveError("archive is corrupt: bad zstd block")
            content = 1 if kind == 1 else size
            if last:
                self.frames += 1
                self._then(content + (4 if self._checksum else 0), "magic")
            else:
                self._then(content, "block")

    def finish(self) -> None:
        if self._state != "magic" or self._buf or self._skip or not self.frames:
            raise ArchiveError("archive is truncated (zstd stream ends inside a frame)")


class _ZstdTee:
    def __init__(self, raw: _Prefixed, frames: ZstdFrames) -> None:
        self._raw = raw
        self._frames = frames

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._frames.feed(data)
        return data


class Limited:
    """Counts decompressed bytes and refuses to deliver more than the current limit."""

    def __init__(self, source: Any, hard_limit: int) -> None:
        self._source = source
        self.count = 0
        self.hard_limit = hard_limit
        self.limit = hard_limit

    def allow(self, extra: int) -> None:
        """Let at most ``extra`` more bytes through (never past the hard limit)."""
        self.limit = min(self.count + extra, self.hard_limit)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = CHUNK
        room = self.limit - self.count
        if room <= 0:
            if self._source.read(1):
                raise LimitExceeded
            return b""
        data: bytes = self._source.read(min(n, room))
        self.count += len(data)
        return data


def read_exact(stream: Any, n: int) -> bytes:
    """``n`` bytes from ``stream`` (fewer only at its end), however short its reads."""
    parts, got = [], 0
    while got < n:
        data = stream.read(n - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def decompressor(stream: BinaryIO) -> tuple[Any, ZstdFrames | None]:
    """The decompressed stream, sniffed from the magic bytes, and the zstd frame
    tracker that must be finished at its end (None for gzip)."""
    head = read_exact(stream, 4)
    raw = _Prefixed(head, stream)
    if head.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=cast(Any, raw), mode="rb"), None
    if head == _ZSTD_MAGIC:
        frames = ZstdFrames()
        dctx = zstandard.ZstdDecompressor()
        reader = dctx.stream_reader(cast(Any, _ZstdTee(raw, frames)), read_across_frames=True)
        return reader, frames
    raise ArchiveError("not a narrative archive (neither gzip nor zstd data)")
