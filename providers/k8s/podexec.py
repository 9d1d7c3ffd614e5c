"""Commands in an environment's pod through the ``pods/exec`` API (a WebSocket, channel
protocol ``v5.channel.k8s.io``: stdin is closed by a close frame, so files and snapshots go in
on stdin), and the shell scripts that run there.

Every command carries a marker in its environment (:data:`providers.proctree.MARKER_VAR`),
inherited by its children, so a timed-out command or a spawned tree is found and signalled
wherever it was re-parented (:data:`providers.proctree.SIGNAL_SCRIPT`). The image needs a
POSIX ``sh``, ``env``, ``setsid``, ``tar``, ``find``, ``grep``, ``sleep`` and ``mkfifo``.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, wait
from typing import Any

from narrative.errors import InvalidInput
from narrative.jsonio import parse_json

from ..base import ExecResult, OutputFn
from ..errors import ExecFailed, ProviderError, ResourceGone
from ..proctree import FIND_MAIN, compact, signal_argv
from ..zygote import ORDER_FILE, ORDER_VERSION, WARM_FLAG
from .rest import KubeRest

__all__ = [
    "ALIVE_SCRIPT",
    "AWAIT_END_SCRIPT",
    "END_CUE",
    "SIGNAL_PID_SCRIPT",
    "SPAWN_SCRIPT",
    "HeldExec",
    "PodExec",
    "new_marker",
    "on_line",
    "wrap",
]

_GRACE = 5.0
"""Seconds to wait for a command's output to end once its processes were killed."""

_WRAP = 'cd "$0" || exit 126\nexec env "$@"\n'
"""Runs ``env NAME=VALUE... argv`` in the workdir ($0)."""

END_CUE = "narrative: the spawned process ended"
"""The line a held spawn prints once its process ended, before the read of its log."""

_WARM_PID = (
    FIND_MAIN
    + r"""
warm_pid() {
    find_main
    [ -n "$main" ] || return 1
    i=0
    while :; do
        case "$(tr '\0' ' ' < "/proc/$main/cmdline" 2>/dev/null)" in
            *" runtime @FLAG@ ") ;;
            *) return 1;;
        esac
        caught=
        { while read -r key value; do
            [ "$key" = SigCgt: ] && caught=$value
        done < "/proc/$main/status"; } 2>/dev/null
        if [ -n "$caught" ] && [ $(( 0x${caught#????????} & 512 )) -ne 0 ]; then
            echo "$main"
            return 0
        fi
        i=$((i + 1))
        [ "$i" -le 200 ] || return 1
        sleep 0.1
    done
}
""".replace("@FLAG@", WARM_FLAG)
)
"""Prints the pid of the pod's warm runtime (:mod:`providers.zygote`): PID 1's first child, as
:data:`~providers.proctree.FIND_MAIN` tells it (started before any exec, so no later process
can pass for it), when its command is ``runtime --warm`` and it is ready (it catches ``SIGUSR1``,
bit 9 of ``SigCgt``, once it has imported everything: waited for up to 20 s). Else fails."""

SPAWN_SCRIPT = compact(
    _WARM_PID
    + r"""
await_gone() {
    read -r pid start < "$pidfile" 2>/dev/null || return 0
    tenths=${1:--1}
    while [ "$tenths" -ne 0 ] && read -r line < "/proc/$pid/stat" 2>/dev/null; do
        set -- ${line##*") "}
        { [ "$1" = Z ] || [ "${20}" != "$start" ]; } && return 0
        tenths=$((tenths - 1))
        sleep 0.1
    done
}
log=$1; envfile=$2; hold=$3; warm=$4; after=$5; shift 5
[ -n "$log" ] || log=/dev/null
up=/tmp/narrative-spawn-$NARRATIVE_EXEC_ID.up
pidfile=/tmp/narrative-spawn-$NARRATIVE_EXEC_ID.pid
if [ -n "$warm" ] && [ -n "$hold" ] && z=$(warm_pid); then
    rm -f "$up" && mkfifo -m 600 "$up" || exit 125
    n=$(($# - warm)); i=0
    {
        printf '%s\0' @VERSION@ "$log" "$envfile" "$up" "$pidfile" "$PWD" "$NARRATIVE_EXEC_ID"
        for a do i=$((i + 1)); [ "$i" -le "$n" ] || printf '%s\0' "$a"; done
    } > @ORDER@ || exit 125
    kill -CONT "$z" 2>/dev/null
    kill -USR1 "$z" || exit 125
else
    if [ -n "$envfile" ]; then
        i=0
        while [ ! -r "$envfile" ]; do
            i=$((i + 1))
            if [ "$i" -gt 1800 ]; then
                echo "the spawned process's environment never reached the pod ($envfile)" >&2
                exit 125
            fi
            sleep 0.1
        done
        . "$envfile"
    fi
    if [ -n "$hold" ]; then
        rm -f "$up" && mkfifo -m 600 "$up" || exit 125
        NARRATIVE_UP_FD=3 setsid "$@" 3>"$up" >>"$log" 2>&1 </dev/null &
    else
        setsid "$@" >>"$log" 2>&1 </dev/null &
    fi
    pid=$!
    start=-
    if read -r line < "/proc/$pid/stat" 2>/dev/null; then
        set -- ${line##*") "}
        start=${20}
    fi
    echo "$pid $start" > "$pidfile"
fi
if [ -n "$hold" ]; then
    (sleep "$hold"; echo waiting >"$up") >/dev/null 2>&1 </dev/null &
    timer=$!
    exec 4<"$up"
    read -r said <&4 || said=
    kill "$timer" 2>/dev/null
    rm -f "$up"
    # the end of the FIFO comes as the process exits, a moment before /proc shows it ended
    [ -n "$said" ] || await_gone 50
    echo "${said:-ended}"
    if [ -n "$after" ]; then
        cat <&4 >/dev/null 2>&1
        exec 4<&-
        await_gone
        echo "@END@"
        sh -c "$after"
        exit 0
    fi
fi
""".replace("@VERSION@", ORDER_VERSION)
    .replace("@ORDER@", ORDER_FILE)
    .replace("@END@", END_CUE)
)
"""Starts ``argv`` detached (its own session, re-parented to PID 1 when this shell ends), after
sourcing its environment from the mounted Secret file (waiting for the kubelet to project it),
and records its pid. $1 log file or "", $2 env file or "", $3 seconds to hold or "": with it, the
command gets the write end of a FIFO as fd 3 (:data:`~providers.base.UP_FD_VAR`) and the script
waits on the read end, so it ends when the runtime says ``up``, when it ended (end of file) or
after that many seconds, and prints ``up``, ``ended`` or ``waiting`` (``ended`` only once
:data:`ALIVE_SCRIPT` would say so, waiting up to 5 s for ``/proc`` to show it). $4: with a
hold, the number of trailing arguments that are ``narrative``'s own (``runtime --connect
URL``), or "": when the pod has a ready warm runtime (:data:`_WARM_PID`), it is handed an
order with those (:mod:`providers.zygote`) instead, and its child does all of the above itself.
$5: with a hold,
a shell command or "": with one, the exec goes on until the process ended (the end of file of
the FIFO, whose write end the runtime holds until it exits, then its recorded pid gone), prints
:data:`END_CUE` and runs that command (the read of its log): one exec a run, not a second one
to wait for its end. Run through
:func:`wrap` with the marker in its environment from the start: a child forked here carries it
in ``/proc/PID/environ`` before it execs the command (an ``export`` would not show there), so
:data:`ALIVE_SCRIPT` never takes a process being started for one that ended."""

ALIVE_SCRIPT = compact(r"""
read -r pid start < "/tmp/narrative-spawn-$0.pid" 2>/dev/null || exit 1
read -r line < "/proc/$pid/stat" 2>/dev/null || exit 1
set -- ${line##*") "}
[ "$1" = Z ] && exit 1
[ "${20}" = "$start" ] || exit 1
exit 0
""")
"""Exit 0 when the spawned process of marker $0 runs: its pid (recorded at spawn with its start
time) is not a zombie and started when it did (so it is not a reused pid). Not its
``environ``: the runtime makes itself non-dumpable (``keep_environment_private``), which makes
that file unreadable, and it reads empty mid-``execve``."""

AWAIT_END_SCRIPT = compact(r"""
left=$1; shift
read -r pid start < "/tmp/narrative-spawn-$0.pid" 2>/dev/null || { [ $# -eq 0 ] || "$@"; exit 0; }
gone() { set -- $1; [ "$1" = Z ] || [ "${20}" != "$start" ]; }
while read -r line < "/proc/$pid/stat" 2>/dev/null; do
    gone "${line##*") "}" && break
    [ "$left" -gt 0 ] || exit 1
    left=$((left - 1))
    sleep 0.1
done
[ $# -eq 0 ] || "$@"
exit 0
""")
"""Exit 0 once the spawned process of marker $0 ended (as :data:`ALIVE_SCRIPT` tells), 1 when it
still runs after $1 tenths of a second. Any further arguments are a command run once it ended
(before the exit 0, whatever its own status): the read of its log that would otherwise be the
hub's next exec."""

SIGNAL_PID_SCRIPT = compact(r"""
m=$0; sig=$1
read -r pid start < "/tmp/narrative-spawn-$m.pid" 2>/dev/null || exit 0
read -r line < "/proc/$pid/stat" 2>/dev/null || exit 0
set -- ${line##*") "}
[ "${20}" = "$start" ] && kill -"$sig" "$pid" 2>/dev/null
exit 0
""")
"""Sends SIGTERM or SIGKILL ($1) to the spawned process of marker $0 itself, by its recorded pid
and start time: a non-dumpable process (the hub's runtime) hides the marker in its environ
from :data:`providers.proctree.SIGNAL_SCRIPT`, which still finds its descendants."""


def wrap(workdir: str, argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """``argv`` run in ``workdir`` with ``env`` added (values on the exec's command line: only
    for what is not secret; a spawn's environment goes through the Secret)."""
    if not argv:
        raise InvalidInput("empty command")
    if "=" in argv[0]:
        raise InvalidInput(f"a program name cannot hold '=': {argv[0]!r}")
    return ["sh", "-c", _WRAP, workdir, *(f"{k}={v}" for k, v in env.items()), *argv]


class PodExec:
    """Runs commands in one container of a pod through the exec WebSocket."""

    def __init__(self, api: KubeRest, namespace: str, container: str = "env") -> None:
        self.api = api
        self.namespace = namespace
        self.container = container

    def _open(self, pod: str, argv: list[str], stdin: bool) -> Any:
        from kubernetes.client.exceptions import ApiException

        flags = {"stderr": True, "stdin": stdin, "stdout": True, "tty": False}
        query = [("command", argv), ("container", self.container)]
        query += [(flag, "true" if on else "false") for flag, on in flags.items()]
        try:
            return self.api.open_exec(pod, self.namespace, query)
        except ApiException as exc:
            text = f"{exc.status} {exc.reason}"
            if exc.status == 404 or " 404" in str(exc.reason):
                raise ResourceGone(pod) from exc
            raise ExecFailed(f"cannot run {argv[-1]!r} in pod {pod}: {text}") from exc

    def run(
        self,
        pod: str,
        argv: list[str],
        *,
        stdin: bytes | None = None,
        timeout: float | None = None,
        on_output: OutputFn | None = None,
        kill_marker: str | None = None,
        max_stdout: int | None = None,
    ) -> ExecResult:
        """Run ``argv`` (already wrapped) to completion, streaming its output; on timeout, the
        processes carrying ``kill_marker`` are killed."""
        client = self._open(pod, argv, stdin is not None)
        out, err = bytearray(), bytearray()
        timed_out = False
        try:
            if stdin is not None:
                view = memoryview(stdin)
                for start in range(0, len(view), 1 << 20):
                    client.write_stdin(bytes(view[start : start + (1 << 20)]))
                client.close_channel(0)
            deadline = None if timeout is None else time.monotonic() + timeout
            while client.is_open():
                wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
                client.update(timeout=wait)
                self._drain(client, out, err, on_output)
                if max_stdout is not None and len(out) > max_stdout:
                    raise InvalidInput(f"the pod's output exceeds the limit of {max_stdout} bytes")
                if deadline is not None and time.monotonic() >= deadline and not timed_out:
                    timed_out = True
                    if kill_marker is not None:
                        self.run(pod, signal_argv(kill_marker, "kill"), timeout=_GRACE * 4)
                    deadline = time.monotonic() + _GRACE
                elif timed_out and deadline is not None and time.monotonic() >= deadline:
                    break
            self._drain(client, out, err, on_output)
            code = -1 if timed_out else _exit_code(client, argv)
        finally:
            client.close()
            # after the server's close frame, close() returns early: the socket stays open
            if getattr(client, "sock", None) is not None:
                client.sock.shutdown()
        return ExecResult(code, bytes(out), bytes(err), timed_out)

    @staticmethod
    def _drain(client: Any, out: bytearray, err: bytearray, on_output: OutputFn | None) -> None:
        for channel, name, sink in ((1, "stdout", out), (2, "stderr", err)):
            chunk = (
                client.read_channel(channel, timeout=0) if client.peek_channel(channel, 0) else b""
            )
            if chunk:
                sink.extend(chunk)
                if on_output is not None:
                    on_output(name, bytes(chunk))

    def quiet(
        self,
        pod: str,
        argv: list[str],
        what: str,
        stdin: bytes | None = None,
        on_output: OutputFn | None = None,
    ) -> bytes:
        """Run a helper command; its stdout, or a :class:`ProviderError` naming ``what``."""
        result = self.run(pod, argv, stdin=stdin, on_output=on_output)
        if result.exit_code != 0:
            detail = (result.stderr or result.stdout).decode(errors="replace").strip()
            raise ProviderError(
                f"{what} failed in pod {pod}: {detail or f'exit {result.exit_code}'}"
            )
        return result.stdout


def _exit_code(client: Any, argv: list[str]) -> int:
    """The exit code the status channel (3) reports; ``ExecFailed`` when it could not start."""
    raw = client.read_channel(3, timeout=0) if client.peek_channel(3, 0) else b""
    if not raw:
        return -1
    try:
        status = parse_json(raw)
    except ValueError:
        return -1
    if status.get("status") == "Success":
        return 0
    causes = (status.get("details") or {}).get("causes") or []
    for cause in causes:
        if cause.get("reason") == "ExitCode":
            return int(cause.get("message", -1))
    raise ExecFailed(f"cannot run {argv[-1]!r}: {status.get('message') or status}")


class HeldExec:
    """An exec run by a thread of its own: its caller goes on once the exec printed one of
    ``lines`` (:meth:`wait_line`) and takes its result later (:meth:`wait_end`), so that one
    exec can start a process and, still open, learn of its end."""

    def __init__(self, run: Callable[[OutputFn], bytes], lines: Sequence[str]) -> None:
        self._wanted = [b"\n" + line.encode() + b"\n" for line in lines]
        self._seen = bytearray(b"\n")
        self._printed = threading.Event()
        self._said = False
        self._end: Future[bytes] = Future()
        threading.Thread(target=self._main, args=(run,), name="k8s-held-exec", daemon=True).start()

    def _main(self, run: Callable[[OutputFn], bytes]) -> None:
        try:
            self._end.set_result(run(self._watch))
        except BaseException as exc:  # handed to whoever waits (wait_line or wait_end)
            self._end.set_exception(exc)
        finally:
            self._printed.set()

    def _watch(self, stream: str, chunk: bytes) -> None:
        if stream != "stdout" or self._said:
            return
        self._seen.extend(chunk)
        if any(wanted in self._seen for wanted in self._wanted):
            self._said = True
            self._seen.clear()
            self._printed.set()

    def wait_line(self) -> None:
        """Return once one of the lines was printed, or the exec ended (raising what it
        raised; when it ended without error but without the line, returning all the same)."""
        self._printed.wait()
        if not self._said:
            self._end.result()

    def wait_end(self, seconds: float) -> bytes | None:
        """The exec's stdout once it ended, None when it runs ``seconds`` on (what it raised,
        raised)."""
        done, _ = wait([self._end], timeout=seconds)
        return self._end.result() if done else None


def on_line(line: str, action: Callable[[], None]) -> OutputFn:
    """An output callback that calls ``action`` once, when a command's stdout has printed
    ``line`` (whole, however its chunks were cut)."""
    wanted = b"\n" + line.encode() + b"\n"
    seen = bytearray(b"\n")
    done = False

    def watch(stream: str, chunk: bytes) -> None:
        nonlocal done
        if done or stream != "stdout":
            return
        seen.extend(chunk)
        if wanted in seen:
            done = True
            action()

    return watch


def new_marker() -> str:
    """A fresh process-tree marker."""
    return secrets.token_hex(12)
