"""Environments that are a directory on this machine: the shared base of ``local`` and
``worktree``.

Commands run as child processes of the caller in the directory (a new session, so a timeout
kills the whole process group). There is no sandbox: these providers isolate the *files* of a
run from the user's workspace, not its processes — use ``docker`` or ``e2b`` for that.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from typing import IO, ClassVar

from narrative.errors import InvalidInput, RestoreError
from narrative.fsutil import write_atomic
from narrative.models import Snapshot
from narrative.objects import hash_object
from narrative.restore import FlatTree, flatten_tree, materialize, sync_directory
from narrative.snapshot import scan_tree, take_snapshot

from .base import BaseProvider, ExecResult, Health, OutputFn, check_relative_path
from .errors import ExecFailed, ResourceGone
from .records import env_state_dir

__all__ = ["DirectoryProvider"]

_CHUNK = 64 * 1024


class DirectoryProvider(BaseProvider):
    """A provider whose resource id is an absolute directory path."""

    category = "local"
    capabilities: ClassVar[frozenset[str]] = frozenset({"exec", "files", "git", "python"})

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, resource_id: str) -> None:
        self.reconnect(resource_id)

    def stop(self, resource_id: str) -> None:
        """A directory has nothing to stop; its files stay as they are."""

    def reconnect(self, resource_id: str) -> None:
        if not os.path.isdir(resource_id):
            raise ResourceGone(resource_id)

    def health(self, resource_id: str) -> Health:
        return Health.OK if os.path.isdir(resource_id) else Health.GONE

    # -- files ----------------------------------------------------------------------------------

    def _path(self, resource_id: str, path: str) -> str:
        rel = check_relative_path(path)
        root = os.path.realpath(resource_id)
        full = os.path.join(root, rel)
        # a symlink inside the directory must not lead the operation outside it
        parent = os.path.realpath(os.path.dirname(full))
        if parent != root and not parent.startswith(root + os.sep):
            raise InvalidInput(f"path escapes the environment's workspace: {path}")
        return full

    def read_file(self, resource_id: str, path: str) -> bytes:
        full = self._path(resource_id, path)
        if os.path.islink(full):
            raise InvalidInput(f"{path} is a symlink")
        try:
            with open(full, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise InvalidInput(f"no such file in the environment: {path}") from None
        except IsADirectoryError:
            raise InvalidInput(f"{path} is a directory") from None

    def write_file(self, resource_id: str, path: str, data: bytes) -> None:
        full = self._path(resource_id, path)
        if os.path.islink(full) or os.path.isdir(full):
            raise InvalidInput(f"{path} is a symlink or a directory")
        os.makedirs(os.path.dirname(full), exist_ok=True)
        self._path(resource_id, path)  # parents created: check again for symlinked dirs
        write_atomic(full, data, durable=False)

    def delete_file(self, resource_id: str, path: str) -> None:
        full = self._path(resource_id, path)
        if os.path.isdir(full) and not os.path.islink(full):
            raise InvalidInput(f"{path} is a directory")
        try:
            os.unlink(full)
        except FileNotFoundError:
            raise InvalidInput(f"no such file in the environment: {path}") from None

    # -- workspace ------------------------------------------------------------------------------

    def restore(self, resource_id: str, snapshot: Snapshot) -> None:
        """Make the directory hold exactly ``snapshot``.

        When it still holds the tree it was last restored to or collected as (the usual case
        between runs), only the paths that differ are written, like a checkout switching
        commits. Otherwise whatever it holds is first snapshotted onto the environment's own
        thread, so a restore never destroys work that was not captured, and it is rewritten.
        """
        self.reconnect(resource_id)
        known = self._known_tree()
        try:
            if known is not None and self._captured(resource_id, known):
                if self._sync(resource_id, known, snapshot):
                    self._remember(snapshot.tree)
                    return
            elif os.listdir(resource_id):
                self._save_to_env_thread(resource_id, f"left in {self.context.env_name}")
            _empty(resource_id)
            materialize(self.context.store, snapshot, resource_id)
        except OSError as exc:
            raise RestoreError(f"cannot restore into {resource_id}: {exc}") from exc
        self._remember(snapshot.tree)

    def _sync(self, resource_id: str, known: bytes, snapshot: Snapshot) -> bool:
        """Write only what differs between ``known`` and ``snapshot``; False when an ignored
        file blocks a path (the caller then rewrites everything)."""
        store = self.context.store
        target = flatten_tree(store.odb, bytes.fromhex(snapshot.tree))
        try:
            sync_directory(store, resource_id, flatten_tree(store.odb, known), target)
        except RestoreError:
            return False
        _remove_strays(resource_id, target)
        return True

    def collect(
        self, resource_id: str, thread_id: str, run_id: str | None, message: str
    ) -> Snapshot:
        self.reconnect(resource_id)
        snapshot = take_snapshot(
            self.context.store,
            thread_id=thread_id,
            run_id=run_id,
            message=message,
            workspace=resource_id,
        ).snapshot
        self._remember(snapshot.tree)
        return snapshot

    def _marker(self) -> str:
        return os.path.join(env_state_dir(self.context.store, self.context.env_id), "tree")

    def _remember(self, tree: str) -> None:
        """Record the tree the directory is known to hold (restored or collected)."""
        write_atomic(self._marker(), tree.encode(), durable=False)

    def _known_tree(self) -> bytes | None:
        """The tree last restored or collected, if recorded."""
        try:
            with open(self._marker(), "rb") as f:
                return bytes.fromhex(f.read().decode())
        except (FileNotFoundError, ValueError):
            return None

    def _captured(self, resource_id: str, known: bytes | None) -> bool:
        """Whether the directory still holds ``known`` (the tree last restored or collected)."""
        if known is None:
            return False
        _scan, root, _cache = scan_tree(self.context.store, resource_id)
        return (root or hash_object("tree", b"")) == known

    def save_leftovers(self, resource_id: str, message: str) -> Snapshot | None:
        """Snapshot the directory onto the environment's thread (created on first use), unless
        it holds exactly what was last restored or collected (then it is saved already)."""
        if self._captured(resource_id, self._known_tree()):
            return None
        return self._save_to_env_thread(resource_id, message)

    def _save_to_env_thread(self, resource_id: str, message: str) -> Snapshot:
        from narrative.hierarchy import create_thread, list_threads

        store = self.context.store
        name = f"env/{self.context.env_name}"
        objective = store.config.default_objective
        thread = next((t for t in list_threads(store, objective) if t.name == name), None)
        if thread is None:
            thread = create_thread(store, objective, name)
        return self.collect(resource_id, thread.id, None, message)

    # -- commands -------------------------------------------------------------------------------

    def exec(
        self,
        resource_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputFn | None = None,
    ) -> ExecResult:
        self.reconnect(resource_id)
        if not argv:
            raise InvalidInput("no command given")
        full_env = {**os.environ, **(env or {})}
        try:
            proc = subprocess.Popen(
                list(argv),
                cwd=resource_id,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise ExecFailed(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from exc
        return _wait_streaming(proc, timeout, on_output)


def _remove_strays(root: str, target: FlatTree) -> None:
    """Remove what ``target`` does not hold (ignored files left by an earlier run)."""
    dirs = {""}
    for path in target:
        parent = os.path.dirname(path)
        while parent not in dirs:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    for current, subdirs, files in os.walk(root):
        rel = os.path.relpath(current, root)
        rel = "" if rel == "." else rel.replace(os.sep, "/")
        prefix = rel + "/" if rel else ""
        for name in list(subdirs):
            full = os.path.join(current, name)
            if os.path.islink(full):
                files.append(name)
            elif prefix + name not in dirs:
                shutil.rmtree(full)
            else:
                continue
            subdirs.remove(name)
        for name in files:
            if prefix + name not in target:
                os.unlink(os.path.join(current, name))


def _empty(directory: str) -> None:
    for name in os.listdir(directory):
        full = os.path.join(directory, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.unlink(full)


def _pump(stream: IO[bytes], name: str, sink: list[bytes], on_output: OutputFn | None) -> None:
    while chunk := stream.read1(_CHUNK):  # type: ignore[attr-defined]
        sink.append(chunk)
        if on_output is not None:
            on_output(name, chunk)


def _wait_streaming(
    proc: subprocess.Popen[bytes], timeout: float | None, on_output: OutputFn | None
) -> ExecResult:
    """Stream both pipes as output arrives; on timeout kill the command's process group."""
    out: list[bytes] = []
    err: list[bytes] = []
    assert proc.stdout is not None and proc.stderr is not None
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, "stdout", out, on_output), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, "stderr", err, on_output), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    except BaseException:
        _kill_group(proc)
        raise
    if timed_out:
        _kill_group(proc)
    for pump in pumps:
        pump.join()
    proc.stdout.close()
    proc.stderr.close()
    code = proc.wait()
    return ExecResult(code if not timed_out else 124, b"".join(out), b"".join(err), timed_out)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
