"""The header of an entry in a git pack: its object's type code and inflated size (git's
``pack-format``: a 3-bit type and a size in little-endian groups of 7 bits)."""

from __future__ import annotations

__all__ = ["TYPE_CODES", "pack_entry_header", "pack_object_header", "parse_entry_header"]

TYPE_CODES = {"commit": 1, "tree": 2, "blob": 3, "tag": 4}
"""Pack type codes of whole objects (6 and 7 are deltas)."""


def pack_object_header(kind: str, size: int) -> bytes:
    """The type-and-size header that starts a pack entry."""
    return pack_entry_header(TYPE_CODES[kind], size)


def parse_entry_header(head: bytes | memoryview) -> tuple[int, int, int]:
    """(type code, inflated size, header length) of the pack entry starting ``head``.

    ValueError when ``head`` is empty, or the header runs past it or encodes an absurd size
    (hostile or truncated packs).
    """
    if not head:
        raise ValueError("pack entry header missing (the pack ends)")
    byte = head[0]
    code, size, shift, pos = (byte >> 4) & 7, byte & 15, 4, 0
    while byte & 0x80:
        pos += 1
        if pos >= len(head) or shift > 56:
            raise ValueError("corrupt pack entry header")
        byte = head[pos]
        size |= (byte & 0x7F) << shift
        shift += 7
    return code, size, pos + 1


def pack_entry_header(code: int, size: int) -> bytes:
    """Pack entry header for a type code (1-4 objects, 6/7 deltas) and inflated size."""
    out = bytearray()
    byte = (code << 4) | (size & 15)
    size >>= 4
    while size:
        out.append(byte | 0x80)
        byte = size & 0x7F
        size >>= 7
    out.append(byte)
    return bytes(out)
