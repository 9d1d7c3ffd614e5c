"""Built-in handlers: files and commands inside one root directory.

``fs:readFile``, ``fs:writeFile``, ``fs:deleteFile``, ``fs:listFiles`` and ``exec:run`` take
``/``-separated paths relative to the root. Every path must pass the path rule
(:func:`narrative.paths.check_path`: no absolute paths, no ``..``, no ``.git`` at any depth, no
``.narrative`` at the top, with the look-alikes file systems fold to them); reads also refuse
credential-like names (:mod:`narrative.credentials`: ``.env*``, ``id_rsa``, ``*.pem``...) unless
the handlers were installed with ``read_credentials=True``. Refusals cross the wire as
``forbidden``. Every file is reached through :class:`narrative.confined.ConfinedRoot`: one
component at a time relative to its parent's descriptor with ``O_NOFOLLOW``, so no symlink is
ever followed, and one swapped in between a check and a use cannot lead outside the root.
``exec:run`` confines the working directory, not what the command itself does: it is for
trusted commands in an isolated environment, which is why a node only runs it where the routing
rules send it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from narrative.confined import ConfinedRoot
from narrative.credentials import credential_name_problem
from narrative.errors import InvalidInput, UnsafePath
from narrative.paths import check_path

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


@contextlib.contextmanager
def _as_gateway_errors(rel: str) -> Iterator[None]:
    """Turn what the file system says about ``rel`` into the gateway's wire codes."""
    try:
        yield
    except UnsafePath as exc:
        raise AccessDenied(str(exc)) from None
    except (FileNotFoundError, NotADirectoryError):
        raise TargetNotFound(f"no such file: {rel}") from None
    except IsADirectoryError:
        raise InvalidInput(f"{rel} is a directory") from None
    except OSError as exc:
        raise AccessDenied(f"cannot access {rel}: {exc.strerror}") from None


class Confined:
    """Checks caller-supplied relative paths, and reaches them only inside ``root``.

    Args:
        root: The directory calls may touch; it must exist.
        deny: Paths inside the root that calls may not touch either (the shadow store and the
            gateway key may live in the workspace; a remote caller must never reach them).
        read_credentials: Serve reads of credential-like names too (off by default).
    """

    def __init__(
        self,
        root: str | Path,
        deny: Iterable[str | Path] = (),
        *,
        read_credentials: bool = False,
    ) -> None:
        if not os.path.isdir(root):
            raise InvalidInput(f"handler root {root} is not a directory")
        self.files = ConfinedRoot(root)
        self.root = self.files.root
        self.deny = tuple(os.path.realpath(d) for d in deny)
        self.read_credentials = read_credentials

    def check(self, rel: str, *, reading: bool) -> str:
        """``rel`` if a call may touch it (``reading``: to read it).

        Paths are never resolved through symlinks (the file actions refuse to follow any), so
        the path joined to the root is the file that would be touched.

        Raises:
            AccessDenied: the path rule refuses ``rel``, it is denied, or (reading) it looks
                like it holds credentials.
            InvalidInput: ``rel`` is empty or contains a NUL byte (malformed, not refused).
        """
        if not rel or "\x00" in rel:
            raise InvalidInput("path must be a non-empty string without NUL bytes")
        with _as_gateway_errors(rel):
            path = check_path(rel)
        if self.denied(os.path.join(self.root, path)):
            raise AccessDenied(f"path is off limits: {rel}")
        if reading and not self.read_credentials:
            reason = credential_name_problem(path)
            if reason is not None:
                raise AccessDenied(f"refusing to read {rel}: {reason}")
        return path

    def resolve(self, rel: str) -> str:
        """The absolute path of the directory ``rel`` (``.``: the root), checked and reached
        without following symlinks.

        Raises:
            AccessDenied: as :meth:`check`, or a symlink on the way.
            TargetNotFound: no such directory.
        """
        path = "" if rel in ("", ".") else self.check(rel, reading=True)
        with _as_gateway_errors(rel):
            os.close(self.files.open_dir(path))
        return os.path.join(self.root, path) if path else self.root

    def denied(self, real: str) -> bool:
        """Whether the absolute path ``real`` is, or is inside, a denied path."""
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
    read_credentials: bool = False,
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
        read_credentials: Let ``fs:readFile`` serve credential-like names (``.env``,
            ``id_rsa``...) too; off by default.

    Returns:
        The :class:`Confined` resolver they share.
    """
    box = Confined(root, deny, read_credentials=read_credentials)

    @registry.handler("fs", "readFile")
    async def read_file(ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        rel = _str(payload, "path")
        encoding = _str(payload, "encoding", "utf-8")
        path = box.check(rel, reading=True)
        with _as_gateway_errors(rel):
            data = box.files.read_bytes(path, max_bytes)
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
        path = box.check(rel, reading=False)
        with _as_gateway_errors(rel):
            box.files.write_bytes(path, data)
        return {"path": rel, "size": len(data)}

    @writing("fs", "deleteFile")
    async def delete_file(ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        rel = _str(payload, "path")
        path = box.check(rel, reading=False)
        with _as_gateway_errors(rel):
            box.files.unlink(path)
        return {"path": rel, "deleted": True}

    @registry.handler("fs", "listFiles")
    async def list_files(ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        rel = _str(payload, "path", ".")
        recursive = bool(payload.get("recursive", False))
        top = "" if rel in ("", ".") else box.check(rel, reading=True)
        entries: list[dict[str, Any]] = []
        with _as_gateway_errors(rel):
            for entry in box.files.walk(top, recursive=recursive):
                if box.denied(os.path.join(box.root, entry.path)):
                    continue
                entries.append({"path": entry.path, "type": entry.kind, "size": entry.size})
                if len(entries) > _MAX_LIST:
                    raise FrameTooLarge(f"more than {_MAX_LIST} entries below {rel}")
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
