"""The one rule for which relative paths may be written into (or read from) a workspace.

Every writer that takes a path from somewhere it does not trust (a snapshot tree, a bundle, an
archive, a gateway call) checks it here first. The rule is git's own ``verify_path`` (git's
``read-cache.c``) with ``core.protectHFS`` and ``core.protectNTFS`` on, so a path we accept is
one stock git accepts too, extended to guard the shadow store:

* components are never empty, ``.`` or ``..`` (so no absolute paths, no ``a//b``, no climbing);
* no component is ``.git`` compared case-insensitively, at any depth, nor a name that some file
  system folds to ``.git``: HFS+ ignores the code points in :data:`HFS_IGNORABLES`
  (``.g\\u200cit``), NTFS drops trailing dots and spaces (``.git. ``), answers to 8.3 short
  names (``git~1``) and to alternate data streams (``.git::$INDEX_ALLOCATION``);
* the first component is not ``.narrative`` under the same foldings, plus Unicode
  normalisation (NFC/NFD, as macOS stores names) and full Unicode case folding;
* no NUL and no backslash (a directory separator on Windows) anywhere;
* at most :data:`MAX_COMPONENT_BYTES` bytes per component and :data:`MAX_PATH_BYTES` in all.

Paths are ``/``-separated, as in git trees, and may be ``str`` or ``bytes``; ``str`` paths are
encoded as the file system encodes them (UTF-8 with ``surrogateescape``, as :func:`os.fsencode`),
so a name read with :func:`os.listdir` checks the same either way.

Two entry points for whole paths: :func:`check_path` raises :class:`~narrative.errors.UnsafePath`
(for writers that must refuse the whole operation), :func:`path_problem` returns the reason or
``None`` (for scanners that skip). Tree walkers that see one entry name at a time use
:func:`check_component` / :func:`component_problem` with the entry's depth.
"""

from __future__ import annotations

import re
from typing import Final

from .errors import UnsafePath

__all__ = [
    "HFS_IGNORABLES",
    "MAX_COMPONENT_BYTES",
    "MAX_PATH_BYTES",
    "STORE_DIR_NAME",
    "check_component",
    "is_plain_name",
    "are_plain_names",
    "check_path",
    "component_problem",
    "is_dotgit",
    "is_hfs_dotgit",
    "is_ntfs_dotgit",
    "is_safe_path",
    "is_store_name",
    "path_problem",
]

#: Longest component, in bytes (NAME_MAX on Linux and macOS).
MAX_COMPONENT_BYTES: Final = 255
#: Longest path, in bytes (PATH_MAX on Linux).
MAX_PATH_BYTES: Final = 4096
#: The shadow store's directory name, refused as a first component.
STORE_DIR_NAME: Final = ".narrative"

#: Code points HFS+ drops from names entirely (git's ``next_hfs_char`` in ``utf8.c``).
HFS_IGNORABLES: Final[frozenset[str]] = frozenset(
    "\u200c\u200d\u200e\u200f"
    "\u202a\u202b\u202c\u202d\u202e"
    "\u206a\u206b\u206c\u206d\u206e\u206f"
    "\ufeff"
)

PathLike = str | bytes


def _as_bytes(path: PathLike) -> bytes | None:
    """``path`` as the file system stores it, or None when a ``str`` cannot be encoded."""
    if isinstance(path, bytes):
        return path
    try:
        return path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no file system name decodes to
        return None


def _as_text(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def is_hfs_dotgit(name: str | bytes) -> bool:
    """Whether HFS+ would open ``name`` as ``.git`` (git's ``is_hfs_dotgit``).

    HFS+ ignores :data:`HFS_IGNORABLES` and folds case; like git, only ASCII is folded (no
    other code point folds to the letters of ``.git``). Also like git, a name whose UTF-8 turns
    invalid (or U+FFFE/U+FFFF) right after ``.git`` counts as ``.git``: git stops reading there.
    """
    text = _as_text(name) if isinstance(name, bytes) else name
    chars = "".join(c for c in text if c not in HFS_IGNORABLES)
    head, rest = chars[:4], chars[4:]
    if not (head.isascii() and head.lower() == ".git"):
        return False
    return not rest or _malformed(rest[0])


def _malformed(char: str) -> bool:
    """Whether ``char`` stands for bytes git's UTF-8 reader refuses."""
    return "\udc80" <= char <= "\udcff" or char in "\ufffe\uffff"


def is_ntfs_dotgit(name: str | bytes) -> bool:
    """Whether NTFS would open ``name`` as ``.git`` (git's ``is_ntfs_dotgit``).

    Matches ``.git`` or its 8.3 short name ``git~1`` (case-insensitively), followed by any
    run of dots and spaces (which NTFS drops), optionally followed by ``:`` and an alternate
    data stream (``.git::$INDEX_ALLOCATION`` is the directory itself).
    """
    raw = _as_bytes(name)
    if raw is None:
        return False
    base = raw.split(b":", 1)[0].rstrip(b". ")
    return base.lower() in (b".git", b"git~1")


def is_dotgit(name: str | bytes) -> bool:
    """Whether the component ``name`` is ``.git`` or a name some file system folds to it."""
    # git's plain check (``verify_dotfile``: ".git" in any case) is a case of the NTFS one.
    return is_hfs_dotgit(name) or is_ntfs_dotgit(name)


def _fold_store_name(name: str) -> str:
    """``name`` as the most aggressive file system we know would compare it."""
    import unicodedata  # (~1 ms to import: a scan of plain names never gets here)

    kept = "".join(c for c in name if c not in HFS_IGNORABLES)
    folded = unicodedata.normalize("NFC", kept).casefold()
    folded = unicodedata.normalize("NFC", folded)
    return folded.split(":", 1)[0].rstrip(". ")  # NTFS: streams, trailing dots and spaces


def is_store_name(name: str | bytes) -> bool:
    """Whether the component ``name`` is ``.narrative`` or a name a file system folds to it
    (case, NFC/NFD, HFS+ ignorables, NTFS trailing dots/spaces, streams, 8.3 ``narrat~1``)."""
    text = _as_text(name) if isinstance(name, bytes) else name
    folded = _fold_store_name(text)
    short = STORE_DIR_NAME[1:7] + "~1"
    return folded in (STORE_DIR_NAME, short)


# Names made only of these, not starting with a dot, can be none of the refused forms (no
# dot-names, no '~' short names, no ':' streams, no non-ASCII look-alikes): checked in one match,
# which keeps the scan of a 50,000-file workspace from paying the full rule on every name.
_PLAIN_PATTERN = r"[A-Za-z0-9_+=,@%-][A-Za-z0-9_.+=,@%-]{0,254}"
_PLAIN = re.compile(_PLAIN_PATTERN.encode())
is_plain_name = re.compile(_PLAIN_PATTERN).fullmatch
"""Fast path for scanners (``str`` names): a match is a name the rule accepts at any depth;
no match means :func:`component_problem` must decide."""
are_plain_names = re.compile(f"(?:{_PLAIN_PATTERN}\0)*").fullmatch
"""The same for a whole directory listing in one match: the names, each followed by a NUL."""


def _component_problem(raw: bytes, top_level: bool) -> str | None:
    if _PLAIN.fullmatch(raw):
        return None
    if not raw:
        return "empty path component"
    if raw in (b".", b".."):
        return f"{_as_text(raw)!r} component"
    if b"\x00" in raw:
        return "NUL byte"
    if b"\\" in raw:
        return "backslash (a directory separator on Windows)"
    if b"/" in raw:
        return "slash inside a component name"
    if is_dotgit(raw):
        return "a '.git' component (git's own metadata)"
    if top_level and is_store_name(raw):
        return f"'{STORE_DIR_NAME}' at the top (the shadow store)"
    if len(raw) > MAX_COMPONENT_BYTES:
        return f"component longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def component_problem(name: str | bytes, *, top_level: bool) -> str | None:
    """Why one path component (a tree entry's name) is refused, or None if it is fine.

    Args:
        name: The component, without slashes.
        top_level: The component is the first of its path (only there is ``.narrative``
            refused; ``.git`` is refused at every depth).
    """
    raw = _as_bytes(name)
    if raw is None:
        return "not encodable as a file name"
    return _component_problem(raw, top_level)


def check_component(name: str | bytes, *, top_level: bool, path: str | bytes | None = None) -> None:
    """Raise :class:`UnsafePath` if :func:`component_problem` refuses ``name``.

    Args:
        name: The component.
        top_level: Whether it is the first component of its path.
        path: The full path to name in the error (default: ``name``).
    """
    reason = component_problem(name, top_level=top_level)
    if reason is not None:
        raise UnsafePath(path if path is not None else name, reason)


def path_problem(path: str | bytes) -> str | None:
    """Why ``path`` is refused by the path rule (see the module docstring), or None."""
    raw = _as_bytes(path)
    if raw is None:
        return "not encodable as a file name"
    if not raw:
        return "empty path"
    if raw.startswith(b"/"):
        return "absolute path"
    if len(raw) > MAX_PATH_BYTES:
        return f"path longer than {MAX_PATH_BYTES} bytes"
    for depth, part in enumerate(raw.split(b"/")):
        reason = _component_problem(part, depth == 0)
        if reason is not None:
            return reason
    return None


def is_safe_path(path: str | bytes) -> bool:
    """Whether the path rule accepts ``path`` (for scanners that skip what they refuse)."""
    return path_problem(path) is None


def check_path(path: str | bytes) -> str:
    """Check ``path`` against the path rule; return it as ``str`` (``os.fsdecode`` form).

    Raises:
        UnsafePath: naming the path and the reason.
    """
    reason = path_problem(path)
    if reason is not None:
        raise UnsafePath(path, reason)
    return _as_text(path) if isinstance(path, bytes) else path
