"""zlib streams of git objects: which library inflates and deflates them, and how long they get.

ISA-L (``isal``) inflates 2.3x and deflates ~4.5x faster than zlib here at the same level-1
ratio (docs/decisions.md); zlib stays the fallback where it does not import, and takes small
objects, which it handles as fast without ISA-L's ~2 ms import. Every stream this store writes
stays within :func:`deflated_bound`, which the object reader relies on.
"""

from __future__ import annotations

import functools
import zlib

TYPE_CHECKING = False  # typing's, without importing typing at run time (~3 ms a process)
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "ISAL_MIN",
    "deflate",
    "deflate_within_bound",
    "deflated_bound",
    "inflater",
    "stream_compressors",
]

ISAL_MIN = 1024
"""Smaller objects go through zlib: as fast, without ISA-L's import."""
_SAMPLE = 4096


@functools.cache
def inflater() -> tuple[Any, tuple[type[Exception], ...]]:
    """The module that inflates git's zlib streams (its ``decompressobj()``) and the errors it
    raises on a damaged one: ``isal.isal_zlib`` when it imports (ISA-L inflates 2.3x faster
    than zlib, docs/decisions.md), else ``zlib``. Loaded on the first call, so that commands
    reading no object never pay for the import."""
    module = _isal_zlib()
    if module is None:  # pragma: no cover - isal is a dependency; a build may lack it
        return zlib, (zlib.error,)
    error: type[Exception] = module.error
    return module, (zlib.error, error)


@functools.cache
def _isal_zlib() -> Any:
    """``isal.isal_zlib`` (ISA-L's zlib-compatible API), or None when it does not import."""
    try:
        from isal import isal_zlib
    except ImportError:  # pragma: no cover - isal is a dependency; a build may lack it
        return None
    return isal_zlib


def deflated_bound(size: int) -> int:
    """The longest zlib stream of ``size`` bytes this store writes, or keeps as it was received.

    Deflate never grows data by more than 5 bytes per 16 KiB block plus a few header bytes, and
    the store's reader relies on that: it reads this many bytes of a packed object at once
    instead of locating the next object (:meth:`ObjectStore.read`)."""
    return size + 5 * (size // 16000 + 1) + 64


def stream_compressors() -> list[Any]:
    """Modules whose ``compressobj(1)`` deflates a large object piece by piece, fastest first:
    ISA-L's, whose stream must then be checked against :func:`deflated_bound`, and zlib's,
    which stays within it."""
    module = _isal_zlib()
    return [zlib] if module is None else [module, zlib]


def deflate(data: bytes | memoryview) -> bytes:
    """A zlib stream of ``data`` at level 1, or stored when a sample does not compress."""
    if len(data) > 2 * _SAMPLE:
        sample = bytes(data[:_SAMPLE])
        if len((_isal_zlib() or zlib).compress(sample, 1)) > _SAMPLE * 0.94:
            return zlib.compress(data, 0)
    return deflate_within_bound(data)


def deflate_within_bound(data: bytes | memoryview) -> bytes:
    """A level-1 zlib stream of ``data`` no longer than :func:`deflated_bound` of its size.

    ISA-L compresses as tightly as zlib's level 1 at about 4.5x its speed (docs/decisions.md);
    its output on incompressible data can pass the bound by a few hundred bytes, and then zlib's
    (which stores such blocks) is taken instead. Small objects go to zlib directly: as fast,
    without ISA-L's import."""
    size = len(data)
    module = _isal_zlib() if size >= ISAL_MIN else None
    if module is not None:
        stream: bytes = module.compress(data, 1)
        if len(stream) <= deflated_bound(size):
            return stream
    return zlib.compress(data, 1)
