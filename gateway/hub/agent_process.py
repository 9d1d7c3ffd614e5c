"""The agent command a runtime starts: output pumped as it arrives, stopped as a whole tree.

The agent stays in the runtime's process group on purpose: when the hub has the provider kill
the runtime's group (``narrative run kill``), the agent dies with it. A graceful stop therefore
signals the agent and its descendants by walking ``/proc``, not the group, so the runtime
itself lives on to take the result snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from narrative.errors import InvalidInput

__all__ = ["Agent", "AgentProcess", "descendants"]

OutputSink = Callable[[str, bytes], Awaitable[None]]
_CHUNK = 64 * 1024
_DRAIN = 2.0


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (children first found, the root first)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: the fields follow the last ')'
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _send(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


class Agent(Protocol):
    """What a runtime needs of its agent: a process here (:class:`AgentProcess`) or a run
    on another hub (:class:`gateway.hub.delegated_agent.DelegatedAgent`)."""

    pid: int
    stopping: str | None

    @property
    def returncode(self) -> int | None:
        """The exit code once the agent ended (None while it runs)."""
        ...

    async def wait(self) -> int:
        """Wait until the agent ended and its output is drained; its exit code."""
        ...

    async def stop(self, grace: float, reason: str = "stop") -> int:
        """Stop it (forcibly after ``grace`` seconds); its exit code."""
        ...


class AgentProcess:
    """One agent command, started with :meth:`start`."""

    def __init__(self, proc: asyncio.subprocess.Process, sink: OutputSink) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._sink = sink
        self._pumps = [
            asyncio.ensure_future(self._pump(proc.stdout, "stdout")),
            asyncio.ensure_future(self._pump(proc.stderr, "stderr")),
        ]
        self.stopping: str | None = None
        """Why the agent is being stopped (``"stop"``, ``"timeout"``), or None."""

    @classmethod
    async def start(
        cls, argv: Sequence[str], cwd: str, env: Mapping[str, str], sink: OutputSink
    ) -> AgentProcess:
        """Start ``argv`` in ``cwd`` with exactly ``env``.

        Raises:
            InvalidInput: the command cannot be started (not found, not executable).
        """
        if not argv:
            raise InvalidInput("no agent command given")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env=dict(env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise InvalidInput(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
        return cls(proc, sink)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def _pump(self, stream: asyncio.StreamReader | None, name: str) -> None:
        if stream is None:
            return
        while chunk := await stream.read(_CHUNK):
            await self._sink(name, chunk)

    async def wait(self) -> int:
        """Wait until the agent exited and its output is drained; its exit code (negative:
        the signal that ended it)."""
        code = await self.proc.wait()
        # A background child may hold the pipes open after the agent exited: drain what it
        # wrote for a moment, then stop reading rather than wait for it.
        _done, pending = await asyncio.wait(self._pumps, timeout=_DRAIN)
        for pump in pending:
            pump.cancel()
        return code

    async def stop(self, grace: float, reason: str = "stop") -> int:
        """SIGTERM the tree, SIGKILL it after ``grace`` seconds; the exit code."""
        self.stopping = self.stopping or reason
        tree = descendants(self.pid)
        if self.proc.returncode is None:
            _send(tree, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.proc.wait()), grace)
        # Whatever is left of the tree (children reparented once the agent exited) goes too.
        _send(tree + descendants(self.pid), signal.SIGKILL)
        return await self.wait()
