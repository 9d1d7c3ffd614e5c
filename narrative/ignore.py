"""Git-compatible ignore rules for the workspace scanner.

Implements the pattern semantics of gitignore(5) exactly as git's ``dir.c`` and ``wildmatch.c``
do (case-sensitive, as with ``core.ignoreCase=false``). The scanner walks directories itself and
asks :meth:`IgnoreRules.is_ignored` once per entry, so matching has to be cheap:

* Each ignore file becomes one *source*. Its patterns are translated into regexes over the
  **reversed** path, alternatives in reverse line order, so the first alternative that matches
  is the winning (last) pattern. Reversing puts the basename first, so a source keeps one regex
  per last character of the path, holding only the patterns that can end in it (most
  branches then start with a literal: ``*.pyc`` becomes ``cyp\\.[^/]*+``). A character that no
  pattern ends with is the fast path: a dict lookup and no regex at all.
* The path is matched relative to the source's base by passing ``endpos``, so the compiled
  regexes do not depend on where the file lives and identical files share them.
* Paths and patterns are compared as UTF-8 bytes (``?`` matches one byte, as in git): non-ASCII
  text is mapped to code points 0-255 through latin-1 before matching.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from collections.abc import Callable, Iterable
from typing import NamedTuple

__all__ = ["IgnoreRules", "ignore_lines", "read_ignore_file"]

_Match = Callable[[str, int, int], "re.Match[str] | None"]

_SLASH = 0x2F
_BYTES = frozenset(range(1, 256))
_NOT_SLASH = _BYTES - {_SLASH}
_GLOB_SPECIAL = "*?[\\"


def _char_range(lo: int, hi: int) -> frozenset[int]:
    return frozenset(range(lo, hi + 1))


_UPPER = _char_range(0x41, 0x5A)
_LOWER = _char_range(0x61, 0x7A)
_DIGIT = _char_range(0x30, 0x39)
_PUNCT = frozenset(c for c in range(0x21, 0x7F) if not chr(c).isalnum())
# git's sane_ctype, not the C library: [:space:] has no \v or \f, nothing above 0x7f matches.
_CLASSES: dict[str, frozenset[int]] = {
    "alnum": _UPPER | _LOWER | _DIGIT,
    "alpha": _UPPER | _LOWER,
    "blank": frozenset(b" \t"),
    "cntrl": _char_range(0x00, 0x1F) | {0x7F},
    "digit": _DIGIT,
    "graph": _char_range(0x21, 0x7E),
    "lower": _LOWER,
    "print": _char_range(0x20, 0x7E),
    "punct": _PUNCT,
    "space": frozenset(b" \t\n\r"),
    "upper": _UPPER,
    "xdigit": _DIGIT | frozenset(b"abcdefABCDEF"),
}


class _Invalid(Exception):
    """The pattern can never match (git's WM_ABORT_ALL, or an empty character class)."""


def _to_bytes_text(text: str) -> str:
    """Map ``text`` to its UTF-8 bytes, one code point (0-255) per byte."""
    if text.isascii():
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("latin-1")


def _class_regex(members: frozenset[int]) -> str:
    if not members:
        raise _Invalid
    if len(members) == 1:
        return re.escape(chr(next(iter(members))))
    parts: list[str] = []
    run: list[int] = []
    for c in sorted(members):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            parts.append(_run_regex(run))
        run = [c]
    parts.append(_run_regex(run))
    return "[" + "".join(parts) + "]"


def _run_regex(run: list[int]) -> str:
    if len(run) == 1:
        return f"\\x{run[0]:02x}"
    return f"\\x{run[0]:02x}-\\x{run[-1]:02x}"


# A token is (reversed regex, first characters it can match, whether it can match empty).
_Token = tuple[str, frozenset[int], bool]

_ANY: _Token = ("[^/]", _NOT_SLASH, False)
_STAR: _Token = ("[^/]*", _NOT_SLASH, True)
_DSTAR: _Token = (".*", _BYTES, True)  # '**' at the end: anything, across directories
_DSTAR_SLASH: _Token = ("(?:/.*)?", frozenset({_SLASH}), True)  # '**/', reversed


def _literal(ch: str) -> _Token:
    return (re.escape(ch), frozenset({ord(ch)}), False)


def _bracket(pat: str, i: int) -> tuple[_Token, int]:
    """Parse the class opening at ``pat[i] == '['`` like wildmatch; return it and the next index."""
    n = len(pat)
    i += 1
    if i >= n:
        raise _Invalid
    negated = pat[i] in "!^"
    if negated:
        i += 1
    members: set[int] = set()
    prev: int | None = None  # previous member, for ranges
    while True:  # wildmatch's do-while: the first character is a member even if it is ']'
        if i >= n:
            raise _Invalid
        ch = pat[i]
        cur: int | None = ord(ch)
        if ch == "\\":
            i += 1
            if i >= n:
                raise _Invalid
            cur = ord(pat[i])
            members.add(cur)
        elif ch == "-" and prev is not None and i + 1 < n and pat[i + 1] != "]":
            i += 1
            if pat[i] == "\\":
                i += 1
                if i >= n:
                    raise _Invalid
            members.update(range(prev, ord(pat[i]) + 1))
            cur = None
        elif ch == "[" and i + 1 < n and pat[i + 1] == ":":
            start = i + 2
            end = pat.find("]", start)
            if end < 0:
                raise _Invalid
            if end == start or pat[end - 1] != ":":
                members.add(ord("["))  # no ":]": a plain '[' member; rescan from the ':'
            else:
                cls = _CLASSES.get(pat[start : end - 1])
                if cls is None:
                    raise _Invalid  # unknown [:name:] aborts the whole match in git
                members.update(cls)
                cur = None
                i = end
        else:
            members.add(ord(ch))
        prev = cur
        i += 1
        if i < n and pat[i] == "]":
            break
    chosen = (_BYTES - members if negated else frozenset(members)) - {_SLASH, 0}
    return (_class_regex(chosen), chosen, False), i + 1


def _tokens(pat: str, pathname: bool) -> list[_Token]:
    """Tokenize a wildmatch pattern; ``pathname`` is WM_PATHNAME (``**`` may cross '/')."""
    out: list[_Token] = []
    n = len(pat)
    i = 0
    while i < n:
        ch = pat[i]
        if ch == "\\":
            i += 1
            if i >= n:
                raise _Invalid  # a trailing backslash never matches
            out.append(_literal(pat[i]))
            i += 1
        elif ch == "?":
            out.append(_ANY)
            i += 1
        elif ch == "[":
            tok, i = _bracket(pat, i)
            out.append(tok)
        elif ch == "*":
            j = i + 1
            while j < n and pat[j] == "*":
                j += 1
            special = (
                pathname
                and j - i >= 2
                and (i == 0 or pat[i - 1] == "/")
                and (j == n or pat[j] == "/" or pat.startswith("\\/", j))
            )
            if not special:
                out.append(_STAR)
            elif j < n and pat[j] == "/":
                out.append(_DSTAR_SLASH)
                j += 1
            else:
                out.append(_DSTAR)
            i = j
        else:
            out.append(_literal(ch))
            i += 1
    return out


def _trim_trailing_spaces(line: str) -> str:
    if not line.endswith(" "):
        return line
    last_space = -1
    i, n = 0, len(line)
    while i < n:
        ch = line[i]
        if ch == " ":
            if last_space < 0:
                last_space = i
        elif ch == "\\":
            i += 1
            if i >= n:
                return line
            last_space = -1
        else:
            last_space = -1
        i += 1
    return line[:last_space] if last_space >= 0 else line


class _Branch(NamedTuple):
    """One pattern, translated."""

    regex: str  # over the reversed path, relative to the base
    first: frozenset[int]  # characters the reversed path can start with when it matches
    negated: bool
    dir_only: bool
    star: bool  # the full regex is "[^/]*+" + regex (see _join)


def _at_slash(toks: list[_Token], k: int) -> bool:
    """Whether the reversed tokens from ``k`` on can only match at a '/' or the end."""
    while toks[k] is _DSTAR_SLASH:
        k += 1  # '(?:/.*)?' may match nothing ("a**/b" keeps no '/' before it)
    return toks[k][0] in ("/", "(?:/|\\Z)", "\\Z")


def _join(toks: list[_Token]) -> tuple[bool, str]:
    """Join reversed tokens into a regex; (True, rest) when it is ``[^/]*+`` + rest.

    A ``*`` followed by a '/' or the end can only stop there, so it is made possessive. A
    leading ``*`` followed by single characters up to a '/' (or the end) must consume the rest
    of that name ("npm-debug.log*" reversed): scanning possessively and checking those
    characters with a lookbehind avoids backtracking, and lets branches share one scan.
    """
    parts = [
        "[^/]*+" if tok is _STAR and _at_slash(toks, k + 1) else tok[0]
        for k, tok in enumerate(toks[:-1])
    ]
    parts.append(toks[-1][0])
    if toks[0] is _STAR:
        k = 1
        while not toks[k][2] and _SLASH not in toks[k][1]:
            k += 1  # single non-'/' characters: literals, '?', classes
        if _at_slash(toks, k):
            fixed = "".join(parts[1:k])
            rest = "".join(parts[k:])
            return True, f"(?<={fixed}){rest}" if fixed else rest
    return False, "".join(parts)


def _parse_line(line: str) -> _Branch | None:
    """Translate one ignore-file line; None for blanks, comments and never-matching patterns."""
    line = line.removesuffix("\n")
    if not line or line[0] == "#":
        return None
    line = _trim_trailing_spaces(_to_bytes_text(line.removesuffix("\r")))
    negated = line.startswith("!")
    pat = line[1:] if negated else line
    dir_only = pat.endswith("/")
    if dir_only:
        pat = pat[:-1]
    try:
        if "/" not in pat:
            # Matched against the basename at any depth below the base.
            toks = _tokens(pat, pathname=False)
            tail: _Token = ("(?:/|\\Z)", frozenset({_SLASH}), False)
        else:
            # Anchored: matched against the path relative to the base. git compares the literal
            # prefix before the first wildcard separately, so a '**' right after it counts as
            # the start of the pattern ("foo**/bar" matches "foo/x/y/bar").
            pat = pat.removeprefix("/")
            cut = next((k for k, c in enumerate(pat) if c in _GLOB_SPECIAL), len(pat))
            toks = [_literal(c) for c in pat[:cut]] + _tokens(pat[cut:], pathname=True)
            tail = ("\\Z", _BYTES, False)
    except _Invalid:
        return None
    if not toks:
        return None  # empty pattern: git never matches it
    toks.reverse()
    toks.append(tail)
    first: set[int] = set()
    for _rx, chars, nullable in toks:
        first |= chars
        if not nullable:
            break
    star, regex = _join(toks)
    return _Branch(regex, frozenset(first), negated, dir_only, star)


@functools.lru_cache(maxsize=1024)
def _compile(branches: tuple[_Branch, ...]) -> _Match | None:
    """One regex, highest precedence first; negated branches end in ``()`` (sets lastindex).

    Only the polarity of the first matching alternative matters, so alternatives may be
    reordered within a run of equal polarity: there, all ``[^/]*+`` branches share one scan.
    """
    if not branches:
        return None
    alts: list[str] = []
    starred: list[str] = []

    def flush() -> None:
        if starred:
            alts.append(
                "[^/]*+" + (starred[0] if len(starred) == 1 else f"(?:{'|'.join(starred)})")
            )
            starred.clear()

    negated = False
    for b in reversed(branches):
        if b.negated != negated:
            flush()
            negated = b.negated
        body = b.regex + "()" if b.negated else b.regex
        (starred if b.star else alts).append(body)
    flush()
    return re.compile("|".join(alts), re.DOTALL).match


class _Table(dict[str, "_Match | None"]):
    """Matchers keyed by the path's last character, built on first use.

    Only the branches that can match a path ending in that character go into its regex, so
    most calls try a handful of alternatives, and a character no pattern ends with (the fast
    path) maps straight to None.
    """

    __slots__ = ("_branches",)

    def __init__(self, branches: tuple[_Branch, ...]) -> None:
        super().__init__()
        self._branches = branches

    def __missing__(self, last: str) -> _Match | None:
        code = ord(last) if last else -1
        match = _compile(tuple(b for b in self._branches if code in b.first))
        self[last] = match
        return match


# One ignore file in a chain: (base + "/" or "", its length, matcher table).
_Link = tuple[str, int, _Table]


class IgnoreRules:
    """Immutable set of ignore patterns in precedence order (later sources override earlier)."""

    __slots__ = ("_any_positive", "_dirs", "_files")

    def __init__(
        self,
        files: tuple[_Link, ...] = (),
        dirs: tuple[_Link, ...] = (),
        any_positive: bool = False,
    ) -> None:
        # Highest precedence first; directories also see the patterns ending in '/'.
        self._files = files
        self._dirs = dirs
        self._any_positive = any_positive

    @classmethod
    def empty(cls) -> IgnoreRules:
        """Rules with no patterns."""
        return _EMPTY

    def extend(self, lines: Iterable[str], base: str) -> IgnoreRules:
        """Return new rules with the patterns of one ignore file appended (highest precedence).

        Args:
            lines: the file's lines (as from :func:`read_ignore_file`); a trailing ``\\n`` or
                ``\\r\\n`` on a line is dropped.
            base: workspace-relative POSIX dir of that file: ``""`` for the root, ``"a/b"``
                otherwise (no leading/trailing slash).

        Returns:
            New rules, or ``self`` if the file has no patterns that can match.
        """
        branches = tuple(b for b in map(_parse_line, lines) if b is not None)
        if not branches:
            return self
        prefix = _to_bytes_text(base) + "/" if base else ""
        files = _Table(tuple(b for b in branches if not b.dir_only))
        return IgnoreRules(
            ((prefix, len(prefix), files), *self._files),
            ((prefix, len(prefix), _Table(branches)), *self._dirs),
            self._any_positive or any(not b.negated for b in branches),
        )

    def is_ignored(self, relpath: str, is_dir: bool) -> bool:
        """Whether git would ignore ``relpath`` itself (parent directories are not consulted).

        Args:
            relpath: workspace-relative POSIX path, no leading slash.
            is_dir: whether the path is a directory (for patterns ending in ``/``).

        Returns:
            True if the last matching pattern is not negated ("!"); False if none matches.
        """
        if not relpath.isascii():
            relpath = _to_bytes_text(relpath)
        last = relpath[-1:]
        rev = ""
        for prefix, cut, table in self._dirs if is_dir else self._files:
            if cut and not relpath.startswith(prefix):
                continue
            match = table[last]
            if match is None:
                continue  # fast path: no pattern can match a name ending in this character
            if not rev:
                rev = relpath[::-1]
            m = match(rev, 0, len(rev) - cut)
            if m is not None:
                return m.lastindex is None
        return False

    def __bool__(self) -> bool:
        """False when no pattern can ignore anything (e.g. there are no patterns)."""
        return self._any_positive

    def __repr__(self) -> str:
        return f"<IgnoreRules sources={len(self._files)}>"


_EMPTY = IgnoreRules()


def read_ignore_file(path: str, *, follow_symlinks: bool = True) -> list[str]:
    """Lines of an ignore file, [] if missing/unreadable (not a regular file, permission, etc.).

    Args:
        path: file to read.
        follow_symlinks: git does not follow a symlinked ``.gitignore`` inside the work tree
            (it does for ``info/exclude`` and ``core.excludesFile``); pass False to match that.

    Returns:
        The lines split on ``\\n`` only, a UTF-8 BOM dropped; undecodable bytes are kept as
        surrogate escapes so patterns match the same bytes git would.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError):
        return []
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []
        chunks: list[bytes] = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError:
        return []
    finally:
        os.close(fd)
    return ignore_lines(b"".join(chunks))


def ignore_lines(data: bytes) -> list[str]:
    """The lines of an ignore file's content, as :func:`read_ignore_file` returns them."""
    lines = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape").split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines
