"""Archives of one snapshot (``tar.gz`` / ``tar.zst``): the format the archive modules share.

Layout of an archive (a POSIX pax tar stream, compressed)::

    narrative.json          the manifest (always the first member): snapshot, records, tree id
                            and one entry per file {path, mode, size, sha256, blob}
    files/<path>            every file of the snapshot, in tree order: regular members (mode
                            0644/0755) and symlink members (linkname = target); no directories

This module owns the names of that format (formats, member names, modes, default levels) and
its error, :class:`ArchiveError`. The rest lives beside it: :mod:`transfer.archive_manifest`
(the manifest and its validation), :mod:`transfer.archive_rules` (what an archive may hold),
:mod:`transfer.archive_write` (the streaming writer), :mod:`transfer.archive_read` (the verified
reader), :mod:`transfer.archive_codec` (the compressed streams), :mod:`transfer.archive_blobs`
(the store's blobs read in chunks) and :mod:`transfer.archive_import` (an imported archive
turned back into a snapshot).
"""

from __future__ import annotations

from narrative.objects import MODE_EXEC, MODE_FILE, MODE_LINK

from .errors import InvalidArtifact

__all__ = [
    "ARCHIVE_FORMATS",
    "CHUNK",
    "DEFAULT_LEVELS",
    "FILES_PREFIX",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "MODES",
    "MODE_NAMES",
    "ArchiveError",
]

ARCHIVE_FORMATS = ("tar.gz", "tar.zst")
MANIFEST_NAME = "narrative.json"
MANIFEST_VERSION = 1
FILES_PREFIX = "files/"
DEFAULT_LEVELS = {"tar.gz": 1, "tar.zst": 3}

#: manifest mode names and the tree modes they stand for
MODES = {"100644": MODE_FILE, "100755": MODE_EXEC, "120000": MODE_LINK}
MODE_NAMES = {v: k for k, v in MODES.items()}

#: most content bytes handled at a time (blob chunks, reads, copies)
CHUNK = 1 << 20


class ArchiveError(InvalidArtifact):
    """An archive is malformed, corrupted, truncated, over a limit or hostile.

    Part of the transfer error tree (``TransferError`` → ``InvalidArtifact``, also a
    ``ValueError``); the message names the member or field at fault.
    """
