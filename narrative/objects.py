"""Git object encoding and decoding (blobs, trees, commits), byte-compatible with stock git.

Kept free of pygit2 so the snapshot fast path starts quickly; pygit2 is only loaded when objects
must be read from packs we did not write (see :mod:`narrative.odb`).
"""

from __future__ import annotations

from .plain import Frozen

TYPE_CHECKING = False  # typing's, without importing typing at run time (~3 ms a process)
if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = [
    "MODE_DIR",
    "MODE_EXEC",
    "MODE_FILE",
    "MODE_LINK",
    "TREE_ENTRY",
    "Commit",
    "Signature",
    "TreeEntry",
    "encode_commit",
    "encode_tree",
    "hash_object",
    "object_header",
    "parse_commit",
    "parse_tree",
    "tree_sort_key",
]

MODE_FILE = 0o100644
MODE_EXEC = 0o100755
MODE_LINK = 0o120000
MODE_DIR = 0o040000

TreeEntry = tuple[bytes, int, bytes]
"""(name, mode, 20-byte binary oid)."""


def object_header(kind: str, size: int) -> bytes:
    """The ``<kind> <size>\\0`` header that git hashes in front of the content."""
    return b"%s %d\x00" % (kind.encode(), size)


def sha1(data: bytes = b"") -> _Hash:
    """A new ``hashlib.sha1``. hashlib is imported on first use: it loads OpenSSL (~3 ms of
    start-up), which a snapshot that finds nothing to hash does without."""
    import hashlib

    return hashlib.sha1(data)


def hash_object(kind: str, data: bytes) -> bytes:
    """Binary sha1 of a git object."""
    h = sha1(object_header(kind, len(data)))
    h.update(data)
    return h.digest()


TREE_ENTRY = b"%o %s\x00%s"
"""One raw tree entry, as git writes it: ``TREE_ENTRY % (mode, name, oid)``."""


def tree_sort_key(name: bytes, mode: int) -> bytes:
    """Git orders tree entries as if directory names ended with '/'."""
    return name + b"/" if mode == MODE_DIR else name


def encode_tree(entries: list[TreeEntry]) -> bytes:
    """Serialise entries (any order) into a canonical git tree."""
    ordered = sorted(entries, key=lambda e: tree_sort_key(e[0], e[1]))
    return b"".join(TREE_ENTRY % (mode, name, oid) for name, mode, oid in ordered)


def parse_tree(data: bytes) -> list[TreeEntry]:
    """Decode a git tree into its entries, in stored order."""
    entries: list[TreeEntry] = []
    pos = 0
    end = len(data)
    while pos < end:
        space = data.index(b" ", pos)
        nul = data.index(b"\x00", space)
        mode = int(data[pos:space], 8)
        entries.append((data[space + 1 : nul], mode, data[nul + 1 : nul + 21]))
        pos = nul + 21
    return entries


class Signature(Frozen):
    """Author/committer line: name, email, unix time and utc offset in minutes."""

    __slots__ = ("email", "name", "offset", "time")
    FIELDS = ("name", "email", "time", "offset")
    name: str
    email: str
    time: int
    offset: int

    def __init__(self, name: str, email: str, time: int, offset: int = 0) -> None:
        self.set_fields(name, email, time, offset)

    def encode(self) -> bytes:
        sign = "-" if self.offset < 0 else "+"
        hours, minutes = divmod(abs(self.offset), 60)
        return f"{self.name} <{self.email}> {self.time} {sign}{hours:02d}{minutes:02d}".encode()

    @classmethod
    def decode(cls, raw: bytes) -> Signature:
        text = raw.decode("utf-8", "replace")
        lt = text.rindex("<")
        gt = text.rindex(">")
        stamp, tz = text[gt + 1 :].split()
        offset = int(tz[1:3]) * 60 + int(tz[3:5])
        return cls(
            text[:lt].strip(), text[lt + 1 : gt], int(stamp), -offset if tz[0] == "-" else offset
        )


class Commit(Frozen):
    """A decoded commit (only what the engine needs)."""

    __slots__ = ("author", "committer", "message", "parents", "tree")
    FIELDS = ("tree", "parents", "author", "committer", "message")
    tree: bytes
    parents: tuple[bytes, ...]
    author: Signature
    committer: Signature
    message: str

    def __init__(
        self,
        tree: bytes,
        parents: tuple[bytes, ...],
        author: Signature,
        committer: Signature,
        message: str,
    ) -> None:
        self.set_fields(tree, parents, author, committer, message)


def encode_commit(commit: Commit) -> bytes:
    """Serialise a commit the way ``git commit-tree`` does."""
    lines = [b"tree " + commit.tree.hex().encode()]
    lines += [b"parent " + p.hex().encode() for p in commit.parents]
    lines.append(b"author " + commit.author.encode())
    lines.append(b"committer " + commit.committer.encode())
    message = commit.message if commit.message.endswith("\n") else commit.message + "\n"
    return b"\n".join(lines) + b"\n\n" + message.encode()


def parse_commit(data: bytes) -> Commit:
    """Decode a commit; unknown headers (gpgsig, encoding, ...) are skipped."""
    head, _, message = data.partition(b"\n\n")
    tree = b""
    parents: list[bytes] = []
    author = committer = Signature("", "", 0)
    continuation = False
    for line in head.split(b"\n"):
        if line.startswith(b" ") and continuation:
            continue
        key, _, value = line.partition(b" ")
        continuation = True
        if key == b"tree":
            tree = bytes.fromhex(value.decode())
        elif key == b"parent":
            parents.append(bytes.fromhex(value.decode()))
        elif key == b"author":
            author = Signature.decode(value)
        elif key == b"committer":
            committer = Signature.decode(value)
    return Commit(tree, tuple(parents), author, committer, message.decode("utf-8", "replace"))
