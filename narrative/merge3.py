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

from itertools import accumulate

from .plain import Frozen

TYPE_CHECKING = False  # typing's, without importing typing at run time (~3 ms a process)
if TYPE_CHECKING:
    from typing import Literal

__all__ = ["TextMerge", "is_binary", "merge_text"]

_BINARY_PROBE = 8000  # git's buffer_is_binary looks at the first 8000 bytes


def is_binary(data: bytes) -> bool:
    """Git's rule: a NUL byte in the first 8000 bytes makes a blob binary."""
    return b"\x00" in data[:_BINARY_PROBE]


class TextMerge(Frozen):
    """Merged content and how many conflict blocks it holds (0: a clean merge)."""

    __slots__ = ("conflicts", "data")
    FIELDS = ("data", "conflicts")
    data: bytes
    conflicts: int

    def __init__(self, data: bytes, conflicts: int) -> None:
        self.set_fields(data, conflicts)


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


def _matcher_blocks(a: list[bytes], b: list[bytes]) -> list[tuple[int, int, int]]:
    """SequenceMatcher's non-empty matching blocks of two line lists (line indexes)."""
    from difflib import SequenceMatcher  # only paid for files both sides edited in the middle

    # autojunk off: it would treat frequent lines (blank lines, braces) as noise.
    matcher = SequenceMatcher(None, a, b, autojunk=False)
    return [(m.a, m.b, m.size) for m in matcher.get_matching_blocks() if m.size]


def _line_blocks(
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
        blocks += [
            (a + head, b + head, size) for a, b, size in _matcher_blocks(middle_base, middle_side)
        ]
    if tail:
        blocks.append((len(base) - tail, len(side) - tail, tail))
    blocks.append((len(base), len(side), 0))
    return blocks


def _byte_blocks(base: bytes, side: bytes) -> list[tuple[int, int, int]]:
    """:func:`_line_blocks` of two contents without ``\r``, in byte offsets.

    Lines then end at ``\n`` only, so the common head and tail are found on the bytes alone and
    only the middle between them is split into lines (for the matcher): on a long file with a
    few edits, most lines are never split at all. Same blocks as :func:`_line_blocks`, each
    (base start, side start, length) measured in bytes instead of lines.
    """
    lb, ls = len(base), len(side)
    if base == side:
        return [(0, 0, lb), (lb, ls, 0)] if lb else [(0, 0, 0)]
    head = base.rfind(b"\n", 0, _byte_prefix(base, side)) + 1  # whole equal lines
    tail = 0
    rest = min(lb, ls) - head  # the tail may not reach into the head on either side
    if rest > 0:
        suffix = _byte_suffix(base, side)
        sb, ss = lb - suffix, ls - suffix
        if (sb == 0 or base[sb - 1] == 10) and (ss == 0 or side[ss - 1] == 10):
            start = sb  # the suffix starts a line on both sides (one of them is whole)
        else:
            nl = base.find(b"\n", sb)
            start = lb if nl < 0 else nl + 1
        tail = min(lb - start, rest)
    blocks = [(0, 0, head)] if head else []
    if lb - tail > head and ls - tail > head:
        middle_base = base[head : lb - tail].splitlines(keepends=True)
        middle_side = side[head : ls - tail].splitlines(keepends=True)
        at_base = list(accumulate(map(len, middle_base), initial=head))
        at_side = list(accumulate(map(len, middle_side), initial=head))
        blocks += [
            (at_base[a], at_side[b], at_base[a + size] - at_base[a])
            for a, b, size in _matcher_blocks(middle_base, middle_side)
        ]
    if tail:
        blocks.append((lb - tail, ls - tail, tail))
    blocks.append((lb, ls, 0))
    return blocks


def _in_bytes(
    blocks: list[tuple[int, int, int]], base: list[bytes], side: list[bytes]
) -> list[tuple[int, int, int]]:
    """Line-indexed blocks of ``base``/``side`` converted to byte offsets."""
    at_base = list(accumulate(map(len, base), initial=0))
    at_side = list(accumulate(map(len, side), initial=0))
    return [(at_base[a], at_side[b], at_base[a + n] - at_base[a]) for a, b, n in blocks]


def _sync_regions(
    a_blocks: list[tuple[int, int, int]],
    b_blocks: list[tuple[int, int, int]],
    ends: tuple[int, int, int],
) -> list[tuple[int, int, int, int]]:
    """(base start, length, ours start, theirs start) of runs all three share, plus a sentinel
    at ``ends`` (the three lengths), from the base↔ours and base↔theirs matching blocks."""
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
    out.append((ends[0], 0, ends[1], ends[2]))
    return out


def _terminated(lines: list[bytes]) -> list[bytes]:
    """Lines inside a conflict block always end with a newline (git adds the missing one)."""
    if lines and not lines[-1].endswith(b"\n"):
        return [*lines[:-1], lines[-1] + b"\n"]
    return lines


def _conflict(out: list[bytes], ours: bytes, theirs: bytes, labels: tuple[str, str]) -> None:
    """Append a conflict block, with lines common to both ends of the two sides moved out."""
    o_lines, t_lines = ours.splitlines(keepends=True), theirs.splitlines(keepends=True)
    head = 0
    while head < min(len(o_lines), len(t_lines)) and o_lines[head] == t_lines[head]:
        head += 1
    tail = 0
    while (
        tail < min(len(o_lines), len(t_lines)) - head and o_lines[-1 - tail] == t_lines[-1 - tail]
    ):
        tail += 1
    out += o_lines[:head]
    out.append(b"<<<<<<< " + labels[0].encode() + b"\n")
    out += _terminated(o_lines[head : len(o_lines) - tail])
    out.append(b"=======\n")
    out += _terminated(t_lines[head : len(t_lines) - tail])
    out.append(b">>>>>>> " + labels[1].encode() + b"\n")
    out += o_lines[len(o_lines) - tail :]


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
    if b"\r" in base or b"\r" in ours or b"\r" in theirs:
        # ``\r`` also ends a line (bytes.splitlines): match on line lists, then in bytes
        b_lines = base.splitlines(keepends=True)
        o_lines = ours.splitlines(keepends=True)
        t_lines = theirs.splitlines(keepends=True)
        a_blocks = _in_bytes(_line_blocks(b_lines, o_lines, base, ours), b_lines, o_lines)
        b_blocks = _in_bytes(_line_blocks(b_lines, t_lines, base, theirs), b_lines, t_lines)
    else:
        a_blocks, b_blocks = _byte_blocks(base, ours), _byte_blocks(base, theirs)
    out: list[bytes] = []
    conflicts = 0
    ib = io = it = 0
    # Regions and chunks are byte ranges on whole-line boundaries: equal bytes, equal lines.
    for b_start, length, o_start, t_start in _sync_regions(
        a_blocks, b_blocks, (len(base), len(ours), len(theirs))
    ):
        o_chunk, t_chunk = ours[io:o_start], theirs[it:t_start]
        if o_chunk or t_chunk or b_start > ib:
            b_chunk = base[ib:b_start]
            if o_chunk == t_chunk:
                out.append(o_chunk)
            elif o_chunk == b_chunk:
                out.append(t_chunk)
            elif t_chunk == b_chunk:
                out.append(o_chunk)
            else:
                conflicts += 1
                if favour is None:
                    _conflict(out, o_chunk, t_chunk, labels)
                else:
                    out.append(o_chunk if favour == "ours" else t_chunk)
        out.append(base[b_start : b_start + length])
        ib, io, it = b_start + length, o_start + length, t_start + length
    return TextMerge(b"".join(out), conflicts)
