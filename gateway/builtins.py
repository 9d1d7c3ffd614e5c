"""Built-in handlers: files and commands inside one root directory.

``fs:readFile``, ``fs:writeFile``, ``fs:deleteFile``, ``fs:listFiles`` and ``exec:run`` take
paths relative to the root; absolute paths, ``..`` that climbs out, and symlinks that point out
are refused with ``forbidden``. Final path components are opened with ``O_NOFOLLOW`` so a
symlink swapped in after the check is not followed either. ``exec:run`` confines the working
directory, not what the command itself does: it is for trusted commands in an isolated
environment, which is why a node only runs it where the routing rules send it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from narrative.errors import InvalidInput

from .errors import AccessDenied, FrameTooLarge, TargetNotFound
from .handlers import Handler, HandlerContext, HandlerRegistry

__all__ = ["DEFAULT_MAX_BYTES", "Confined", "install_builtins"]

#: Largest file read or written in one call (the frame limit bounds the rest).
DEFAULT_MAX_BYTES = 768 * 1024
_MAX_LIST = 10_000
_MAX_OUTPUT = 256 * 1024


def _str(payload: dict[str, Any], name: str, default: str | None = None) -> str:
    value = payload.get(name, default)
    if not isinstance(value, str):
        raise InvalidInput(f"{name!r} must be a string")
    return value


class Confined:
    """Resolves caller-supplied relative paths inside ``root``, refusing any that escape.

    Args:
        root: The directory calls may touch; it must exist.
        deny: Paths inside the root that calls may not touch either (the shadow store and the
            gateway key live in the workspace; a remote caller must never read them).
    """

    def __init__(self, root: str | Path, deny: Iterable[str | Path] = ()) -> None:
        real = os.path.realpath(root)
        if not os.path.isdir(real):
            raise InvalidInput(f"handler root {root} is not a directory")
        self.root = real
        self.deny = tuple(os.path.realpath(d) for d in deny)

    def resolve(self, rel: str) -> str:
        """The absolute path for ``rel``.

        Raises:
            AccessDenied: ``rel`` is absolute, or resolves (through ``..`` or symlinks)
                outside the root.
            InvalidInput: ``rel`` is empty or contains a NUL byte.
        """
        if not rel or "\x00" in rel:
            raise InvalidInput("path must be a non-empty string without NUL bytes")
        if os.path.isabs(rel):
            raise AccessDenied(f"absolute path refused: {rel}")
        real = os.path.realpath(os.path.join(self.root, rel))
        if real != self.root and not real.startswith(self.root + os.sep):
            raise AccessDenied(f"path escapes the root: {rel}")
        if self.denied(real):
            raise AccessDenied(f"path is off limits: {rel}")
        return real

    def denied(self, real: str) -> bool:
        """Whether the resolved path ``real`` is, or is inside, a denied path."""
        return any(real == d or real.startswith(d + os.sep) for d in self.deny)

    def relative(self, path: str) -> str:
        return os.path.relpath(path, self.root)


def install_builtins(
    registry: HandlerRegistry,
    root: str | Path,
    *,
    deny: Iterable[str | Path] = (),
    max_bytes: int = DEFAULT_MAX_BYTES,
    commands: bool = True,
    writes: bool = True,
) -> Confined:
    """Register the file and command handlers on ``registry``, confined to ``root``.

    Args:
        registry: Where to register them.
        root: The only directory they touch.
        deny: Paths below ``root`` they must not touch (the store, the key file).
        max_bytes: Largest file read or written in one call.
        commands: Register ``exec:run`` too (a hub serving the user's own workspace leaves it
            out unless told otherwise).
        writes: Register ``fs:writeFile`` and ``fs:deleteFile`` too (off: read-only).

    Returns:
        The :class:`Confined` resolver they share.
    """
    box = Confined(root, deny)

    @registry.handler("fs", "readFile")
    async def read_file(ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        rel = _str(payload, "path")
        encoding = _str(payload, "encoding", "utf-8")
        path = box.resolve(rel)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise TargetNotFound(f"no such file: {rel}") from None
        except OSError as exc:
            raise AccessDenied(f"cannot open {rel}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise InvalidInput(f"not a regular file: {rel}")
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise FrameTooLarge(f"{rel} is larger than {max_bytes} bytes")
        if encoding == "base64":
            content = base64.b64encode(data).decode("ascii")
        elif encoding == "utf-8":
            try:
                content = data.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"{rel} is not UTF-8 text (use encoding base64)") from None
        else:
            raise InvalidInput(f"unknown encoding {encoding!r}")
        return {"path": rel, "content": content, "encoding": encoding, "size": len(data)}

    def writing(kind: str, action: str) -> Callable[[Handler], Handler]:
        return registry.handler(kind, action) if writes else (lambda func: func)

    @writing("fs", "writeFile")
    async def write_file(ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        rel = _str(payload, "path")
        content = _str(payload, "content")
        encoding = _str(payload, "encoding", "utf-8")
        if encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except binascii.Error:
                raise InvalidInput("content is not valid base64") from None
        elif encoding == "utf-8":
            data = content.encode("utf-8")
        else:
            raise InvalidInput(f"unknown encoding {encoding!r}")
        if len(data) > max_bytes:
            raise FrameTooLarge(f"content is larger than {max_bytes} bytes")
        path = box.resolve(rel)
        if path == box.root:
            raise InvalidInput("cannot write the root itself")
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        box.resolve(box.relative(parent))  # a parent created through a racing symlink
        # Temp file + rename: readers never see a half-written file.
        tmp = os.path.join(parent, f".gateway-{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return {"path": rel, "size": len(data)}

    @writing("fs", "deleteFile")
    async def delete_file(ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        rel = _str(payload, "path")
        path = box.resolve(rel)
        # The symlink itself is what "path" names; resolve() followed it, so lstat the
        # unresolved name inside the root instead.
        name = os.path.join(box.root, os.path.normpath(rel))
        try:
            info = os.lstat(name)
        except FileNotFoundError:
            raise TargetNotFound(f"no such file: {rel}") from None
        if stat.S_ISDIR(info.st_mode):
            raise InvalidInput(f"{rel} is a directory")
        os.unlink(name if stat.S_ISLNK(info.st_mode) else path)
        return {"path": rel, "deleted": True}

    @registry.handler("fs", "listFiles")
    async def list_files(ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        rel = _str(payload, "path", ".")
        recursive = bool(payload.get("recursive", False))
        top = box.resolve(rel)
        if not os.path.isdir(top):
            raise TargetNotFound(f"no such directory: {rel}")
        entries: list[dict[str, Any]] = []
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(
                d for d in dirnames if not box.denied(os.path.realpath(os.path.join(dirpath, d)))
            )
            for name in sorted(dirnames + filenames):
                full = os.path.join(dirpath, name)
                if box.denied(os.path.realpath(full)):
                    continue
                info = os.lstat(full)
                kind = (
                    "dir"
                    if stat.S_ISDIR(info.st_mode)
                    else "symlink"
                    if stat.S_ISLNK(info.st_mode)
                    else "file"
                )
                entries.append({"path": box.relative(full), "type": kind, "size": info.st_size})
                if len(entries) > _MAX_LIST:
                    raise FrameTooLarge(f"more than {_MAX_LIST} entries below {rel}")
            if not recursive:
                break
        return {"path": rel, "entries": entries}

    if not commands:
        return box

    @registry.handler("exec", "run")
    async def run(ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        argv = payload.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise InvalidInput("'argv' must be a non-empty list of strings")
        cwd = box.resolve(_str(payload, "cwd", "."))
        stdin = payload.get("stdin")
        if stdin is not None and not isinstance(stdin, str):
            raise InvalidInput("'stdin' must be a string")
        env = {k: v for k, v in os.environ.items() if k != "NARRATIVE_TOKEN"}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise TargetNotFound(f"command not found: {argv[0]}") from None
        except PermissionError:
            raise AccessDenied(f"cannot execute {argv[0]}") from None
        try:
            if stdin is not None and proc.stdin is not None:
                proc.stdin.write(stdin.encode())
                await proc.stdin.drain()
                proc.stdin.close()
            out, err = await asyncio.gather(
                _pump(ctx, "stdout", proc.stdout), _pump(ctx, "stderr", proc.stderr)
            )
            code = await proc.wait()
        except BaseException:
            # Cancelled or timed out: the command must not outlive its call.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            with contextlib.suppress(BaseException):
                await proc.wait()
            raise
        return {"exitCode": code, "stdout": out, "stderr": err}

    return box


async def _pump(ctx: HandlerContext, name: str, stream: asyncio.StreamReader | None) -> str:
    """Stream a command's output as partial results, line by line; keep a bounded copy."""
    if stream is None:
        return ""
    kept: list[str] = []
    size = 0
    while line := await stream.readline():
        text = line.decode("utf-8", "replace")
        await ctx.partial({"stream": name, "data": text})
        if size < _MAX_OUTPUT:
            kept.append(text[: _MAX_OUTPUT - size])
            size += len(kept[-1])
    return "".join(kept)
