"""Line-level three-way merge of text content, with git's conflict markers.

The classic diff3 algorithm: lines that base, ours and theirs all share (the intersection of the
base↔ours and base↔theirs matching blocks) split the files into stable regions; between them a
region changed by one side takes that side, a region changed identically by both takes it once,
and a region changed differently by both is a conflict. As in git (``xdl_merge``), hunks that
merely touch conflict, and lines both sides added identically at the start or end of a conflict
are moved out of it (git's "zealous" level), so ``git merge-file`` agrees with us on clean
merges and on simple conflicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["TextMerge", "is_binary", "merge_text"]

_BINARY_PROBE = 8000  # git's buffer_is_binary looks at the first 8000 bytes


def is_binary(data: bytes) -> bool:
    """Git's rule: a NUL byte in the first 8000 bytes makes a blob binary."""
    return b"\x00" in data[:_BINARY_PROBE]


@dataclass(frozen=True)
class TextMerge:
    """Merged content and how many conflict blocks it holds (0: a clean merge)."""

    data: bytes
    conflicts: int


def _byte_prefix(a: bytes, b: bytes) -> int:
    """Length of the common prefix of ``a`` and ``b``, by galloping and bisection.

    ``bytes.startswith`` with a memoryview argument and a start offset is a memcmp of just the
    range in question: no copies, and each byte is compared O(1) times.
    """
    n = min(len(a), len(b))
    with memoryview(b) as mb:
        if a.startswith(mb[:n]):
            return n
        lo, step = 0, 256  # a[:lo] == b[:lo]; a mismatch lies in [lo, hi)
        while lo + step < n and a.startswith(mb[lo : lo + step], lo):
            lo += step
            step *= 2
        hi = min(n, lo + step)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if a.startswith(mb[lo:mid], lo):
                lo = mid
            else:
                hi = mid
    return lo


def _byte_suffix(a: bytes, b: bytes) -> int:
    """Length of the common suffix of ``a`` and ``b`` (see :func:`_byte_prefix`)."""
    la, lb = len(a), len(b)
    n = min(la, lb)
    with memoryview(b) as mb:
        if a.endswith(mb[lb - n :]):
            return n
        lo, step = 0, 256  # the last lo bytes are equal; a mismatch lies within the last hi
        while lo + step < n and a.startswith(mb[lb - lo - step : lb - lo], la - lo - step):
            lo += step
            step *= 2
        hi = min(n, lo + step)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if a.startswith(mb[lb - mid : lb - lo], la - mid):
                lo = mid
            else:
                hi = mid
    return lo


def _line_count(data: bytes, start: int, end: int) -> int | None:
    """How many lines ``data[start:end]`` splits into, or None when it holds a ``\r`` (which
    :meth:`bytes.splitlines` also treats as a line end)."""
    if data.find(b"\r", start, end) >= 0:
        return None
    count = data.count(b"\n", start, end)
    return count + 1 if end > start and data[end - 1] != 10 else count


def _common_head(a: list[bytes], b: list[bytes], a_raw: bytes, b_raw: bytes) -> int:
    """Number of equal leading lines of the line lists ``a``/``b`` of ``a_raw``/``b_raw``.

    The common byte prefix, cut back to the last ``\n`` in it, is made of whole lines equal
    on both sides; the line loop then only checks the few lines after it (usually none).
    """
    limit = min(len(a), len(b))
    if a_raw == b_raw:
        return limit
    cut = a_raw.rfind(b"\n", 0, _byte_prefix(a_raw, b_raw)) + 1
    head = _line_count(a_raw, 0, cut)
    if head is None:
        return _bisect_head(a, b)
    head = min(head, limit)
    while head < limit and a[head] == b[head]:
        head += 1
    return head


def _common_tail(a: list[bytes], b: list[bytes], limit: int, a_raw: bytes, b_raw: bytes) -> int:
    """Number of equal trailing lines, at most ``limit`` (see :func:`_common_head`)."""
    if limit <= 0:
        return 0
    start = len(a_raw) - _byte_suffix(a_raw, b_raw)
    # Lines after a ``\n`` inside the common suffix are whole lines equal on both sides.
    nl = a_raw.find(b"\n", start)
    tail = 0 if nl < 0 else _line_count(a_raw, nl + 1, len(a_raw))
    if tail is None:
        return _bisect_tail(a, b, limit)
    tail = min(tail, limit)
    while tail < limit and a[len(a) - 1 - tail] == b[len(b) - 1 - tail]:
        tail += 1
    return tail


def _bisect_head(a: list[bytes], b: list[bytes]) -> int:
    """Number of equal leading lines, by bisection on slice equality (C speed, no loop)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _bisect_tail(a: list[bytes], b: list[bytes], limit: int) -> int:
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid :] == b[len(b) - mid :]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _matches(
    base: list[bytes], side: list[bytes], base_raw: bytes, side_raw: bytes
) -> list[tuple[int, int, int]]:
    """Matching blocks (base start, side start, length), ending with a zero-length sentinel.

    The common head and tail are matched directly and only the middle goes to SequenceMatcher:
    a typical edit touches a few lines of a long file, and the matcher is superlinear.
    """
    head = _common_head(base, side, base_raw, side_raw)
    tail = _common_tail(base, side, min(len(base), len(side)) - head, base_raw, side_raw)
    blocks = [(0, 0, head)] if head else []
    middle_base, middle_side = base[head : len(base) - tail], side[head : len(side) - tail]
    if middle_base and middle_side:
        from difflib import SequenceMatcher  # only paid for files both sides edited

        # autojunk off: it would treat frequent lines (blank lines, braces) as noise.
        matcher = SequenceMatcher(None, middle_base, middle_side, autojunk=False)
        blocks += [
            (m.a + head, m.b + head, m.size) for m in matcher.get_matching_blocks() if m.size
        ]
    if tail:
        blocks.append((len(base) - tail, len(side) - tail, tail))
    blocks.append((len(base), len(side), 0))
    return blocks


def _sync_regions(
    base: list[bytes],
    ours: list[bytes],
    theirs: list[bytes],
    raw: tuple[bytes, bytes, bytes],
) -> list[tuple[int, int, int, int]]:
    """(base start, length, ours start, theirs start) of runs all three share, plus a sentinel.

    ``raw`` holds the three contents the line lists were split from."""
    a_blocks = _matches(base, ours, raw[0], raw[1])
    b_blocks = _matches(base, theirs, raw[0], raw[2])
    out = []
    ia = ib = 0
    while ia < len(a_blocks) and ib < len(b_blocks):
        a_base, a_pos, a_len = a_blocks[ia]
        b_base, b_pos, b_len = b_blocks[ib]
        start, end = max(a_base, b_base), min(a_base + a_len, b_base + b_len)
        if start < end:
            out.append((start, end - start, a_pos + start - a_base, b_pos + start - b_base))
        if a_base + a_len < b_base + b_len:
            ia += 1
        else:
            ib += 1
    out.append((len(base), 0, len(ours), len(theirs)))
    return out


def _terminated(lines: list[bytes]) -> list[bytes]:
    """Lines inside a conflict block always end with a newline (git adds the missing one)."""
    if lines and not lines[-1].endswith(b"\n"):
        return [*lines[:-1], lines[-1] + b"\n"]
    return lines


def _conflict(
    out: list[bytes], ours: list[bytes], theirs: list[bytes], labels: tuple[str, str]
) -> None:
    """Append a conflict block, with lines common to both ends of the two sides moved out."""
    head = 0
    while head < min(len(ours), len(theirs)) and ours[head] == theirs[head]:
        head += 1
    tail = 0
    while tail < min(len(ours), len(theirs)) - head and ours[-1 - tail] == theirs[-1 - tail]:
        tail += 1
    out += ours[:head]
    out.append(b"<<<<<<< " + labels[0].encode() + b"\n")
    out += _terminated(ours[head : len(ours) - tail])
    out.append(b"=======\n")
    out += _terminated(theirs[head : len(theirs) - tail])
    out.append(b">>>>>>> " + labels[1].encode() + b"\n")
    out += ours[len(ours) - tail :]


def merge_text(
    base: bytes,
    ours: bytes,
    theirs: bytes,
    labels: tuple[str, str] = ("ours", "theirs"),
    favour: Literal["ours", "theirs"] | None = None,
) -> TextMerge:
    """Three-way merge of three versions of a text file (lines split after ``\\n``).

    With ``favour`` a conflicting hunk takes that side's lines instead of markers (like
    ``git merge-file --ours/--theirs``); ``conflicts`` still counts those hunks.
    """
    b_lines = base.splitlines(keepends=True)
    o_lines = ours.splitlines(keepends=True)
    t_lines = theirs.splitlines(keepends=True)
    out: list[bytes] = []
    conflicts = 0
    ib = io = it = 0
    for b_start, length, o_start, t_start in _sync_regions(
        b_lines, o_lines, t_lines, (base, ours, theirs)
    ):
        o_chunk, t_chunk = o_lines[io:o_start], t_lines[it:t_start]
        if o_chunk or t_chunk or b_start > ib:
            b_chunk = b_lines[ib:b_start]
            if o_chunk == t_chunk:
                out += o_chunk
            elif o_chunk == b_chunk:
                out += t_chunk
            elif t_chunk == b_chunk:
                out += o_chunk
            else:
                conflicts += 1
                if favour is None:
                    _conflict(out, o_chunk, t_chunk, labels)
                else:
                    out += o_chunk if favour == "ours" else t_chunk
        out += b_lines[b_start : b_start + length]
        ib, io, it = b_start + length, o_start + length, t_start + length
    return TextMerge(b"".join(out), conflicts)
