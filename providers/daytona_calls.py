"""Calls into the ``daytona`` SDK for the daytona provider: HTTP 429 waited out as the server
asks (``Retry-After`` in seconds or as an HTTP date, else a doubling backoff), every SDK or
transport error translated into the providers' error tree in one place, and the shape of the
provider's process handles (``daytona:<command id>:<marker>``, the session named after the
marker)."""

from __future__ import annotations

import atexit
import email.utils
import logging
import os
import re
import shlex
import threading
import warnings
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
from daytona import (
    Daytona,
    DaytonaAuthenticationError,
    DaytonaBadRequestError,
    DaytonaConnectionError,
    DaytonaError,
    DaytonaFileNotFoundError,
    DaytonaForbiddenError,
    DaytonaNotFoundError,
    DaytonaRateLimitError,
    DaytonaServiceUnavailableError,
    DaytonaTimeoutError,
    DaytonaValidationError,
)
from daytona import DaytonaConfig as SDKConfig

from narrative.errors import InvalidInput, NarrativeError

from .base import ProviderContext
from .errors import ProviderError, ProviderUnavailable, ResourceGone
from .records import env_state_dir

__all__ = [
    "HANDLE_PREFIX",
    "MARKER_LENGTH",
    "SESSION_PREFIX",
    "TOO_LARGE",
    "call_daytona",
    "exports_file",
    "extract_script",
    "keep_awake",
    "make_client",
    "pack_script",
    "parse_handle",
    "record_session",
    "session_line",
    "session_recorded",
    "retry_after",
    "translate",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

SESSION_PREFIX = "narrative-"
"""Sessions the provider opens (``end_leftovers`` ends them all)."""
HANDLE_PREFIX = "daytona:"
MARKER_LENGTH = 24
"""Hex digits of a command's marker (:data:`providers.proctree.MARKER_VAR`)."""
_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0


def make_client(api_key_env: str, api_url: str | None, target: str | None) -> Daytona:
    """An SDK client with the key from the variable ``api_key_env`` (never from records).

    Raises:
        ProviderUnavailable: the variable is unset, or the SDK refuses to start.
    """
    key = os.environ.get(api_key_env)
    if not key:
        raise ProviderUnavailable(f"no Daytona API key: set the variable {api_key_env}")
    options = SDKConfig(api_key=key, api_url=api_url, target=target)
    try:
        with warnings.catch_warnings():
            # the SDK reads its own deprecated ``server_url`` when no api_url is given
            warnings.simplefilter("ignore", DeprecationWarning)
            return Daytona(options)
    except DaytonaError as exc:
        raise translate(exc, None, None) from exc


def call_daytona(
    fn: Callable[[], T],
    resource_id: str | None,
    path: str | None,
    max_wait: float,
    sleep: Callable[[float], None],
) -> T:
    """``fn()``, retried while Daytona answers 429 for at most ``max_wait`` seconds of
    ``sleep`` in all; any error (a 429 past that too) translated by :func:`translate`."""
    waited = 0.0
    backoff = _BACKOFF_FIRST
    while True:
        try:
            return fn()
        except Exception as exc:
            headers = _rate_limited(exc)
            if headers is not None:
                delay = retry_after(headers)
                if delay is None:
                    delay, backoff = backoff, min(backoff * 2, _BACKOFF_MAX)
                if waited + delay <= max_wait:
                    log.info("daytona rate limit: retrying in %.1fs", delay)
                    sleep(delay)
                    waited += delay
                    continue
            translated = translate(exc, resource_id, path)
            if translated is exc:
                raise
            raise translated from exc


def retry_after(headers: Mapping[str, Any], now: datetime | None = None) -> float | None:
    """The wait a 429 answer asks for: ``Retry-After`` in seconds or as an HTTP date."""
    value = next((str(v) for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


def translate(exc: Exception, resource_id: str | None, path: str | None) -> Exception:
    """The one place Daytona SDK and transport errors become the providers' error tree."""
    if isinstance(exc, NarrativeError | OSError) and not isinstance(exc, ConnectionError):
        return exc
    if isinstance(exc, DaytonaFileNotFoundError) or (
        isinstance(exc, DaytonaNotFoundError) and path is not None
    ):
        return FileNotFoundError(f"{path}: no such file in the environment")
    if isinstance(exc, DaytonaNotFoundError):
        return ResourceGone(resource_id or "(daytona sandbox)")
    if isinstance(exc, DaytonaAuthenticationError | DaytonaForbiddenError):
        return ProviderUnavailable("daytona refused the API key (check the configured api_key_env)")
    if isinstance(exc, DaytonaRateLimitError):
        return ProviderUnavailable(f"daytona rate limit: {exc}")
    if isinstance(
        exc,
        DaytonaConnectionError
        | DaytonaTimeoutError
        | DaytonaServiceUnavailableError
        | httpx.TransportError
        | ConnectionError,
    ):
        return ProviderUnavailable(f"daytona sandbox {resource_id} unreachable: {exc}")
    if isinstance(exc, DaytonaBadRequestError | DaytonaValidationError):
        return InvalidInput(f"daytona refused the request: {exc}")
    if isinstance(exc, DaytonaError | httpx.HTTPStatusError):
        return ProviderError(f"daytona: {exc}")
    return exc


def _rate_limited(exc: Exception) -> Mapping[str, Any] | None:
    """The headers of an HTTP 429 answer, whichever SDK path raised it; None otherwise."""
    if isinstance(exc, DaytonaRateLimitError):
        return exc.headers
    if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 429:
        return exc.response.headers
    if isinstance(exc, DaytonaError) and exc.status_code == 429:
        return exc.headers
    return None


_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def session_line(directory: str, variables: Mapping[str, str], command: str, quiet: bool) -> str:
    """The shell line a session runs: ``command`` in ``directory`` with ``variables``, its
    input closed (its output discarded when ``quiet``)."""
    assigned = " ".join(shlex.quote(f"{k}={v}") for k, v in variables.items())
    line = f"cd {shlex.quote(directory)} && exec env {assigned} {command}"
    return line + (" </dev/null >/dev/null 2>&1" if quiet else " </dev/null")


def exports_file(variables: Mapping[str, str]) -> bytes:
    """A file of ``export`` lines a session line sources and removes: what must not be on the
    line, which the daemon keeps and lists (a run's token)."""
    for name in variables:
        if not _VARIABLE.fullmatch(name):
            raise InvalidInput(f"not a variable name: {name!r}")
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in variables.items()).encode()


TOO_LARGE = 9
"""What :func:`pack_script` exits with when the workspace is over the limit."""


def pack_script(workdir: str, tar: str, limit: int) -> str:
    """The script that packs ``workdir`` into ``tar`` (its directory made first) and removes
    it again, exiting :data:`TOO_LARGE`, when it is over ``limit`` bytes (plus tar's own)."""
    staging, tar_q = shlex.quote(os.path.dirname(tar)), shlex.quote(tar)
    return (
        f"mkdir -p {staging} && cd {shlex.quote(workdir)} && tar -c -f {tar_q} . || exit 1;"
        f" size=$(wc -c < {tar_q})"
        f' && if [ "$size" -gt {limit + (1 << 20)} ]; then rm -f {tar_q}; exit {TOO_LARGE}; fi'
    )


def extract_script(workdir: str, tar: str) -> str:
    """The script that replaces ``workdir`` by what ``tar`` holds and removes ``tar``."""
    workdir_q, tar_q = shlex.quote(workdir), shlex.quote(tar)
    return (
        f"rm -rf {workdir_q} && mkdir -p {workdir_q} && cd {workdir_q}"
        f" && tar -x -f {tar_q}; code=$?; rm -f {tar_q}; exit $code"
    )


def parse_handle(handle: str) -> tuple[str, str]:
    """``(session, command id)`` of a process handle; anything else is refused."""
    parts = handle.split(":") if isinstance(handle, str) else []
    valid = (
        len(parts) == 3
        and f"{parts[0]}:" == HANDLE_PREFIX
        and 0 < len(parts[1]) <= 64
        and all(c.isalnum() or c in "-_" for c in parts[1])
        and len(parts[2]) == MARKER_LENGTH
        and all(c in "0123456789abcdef" for c in parts[2])
    )
    if not valid:
        raise InvalidInput(f"not a process handle of a daytona environment: {handle!r}")
    return f"{SESSION_PREFIX}{parts[2]}", parts[1]


def keep_awake(still_running: Callable[[], bool], period: float, name: str) -> threading.Thread:
    """A daemon thread that calls ``still_running`` every ``period`` seconds until it answers
    False or fails (what a call records as activity is the caller's business). At exit the
    threads are told to end and waited for: a daemon thread caught mid-request by the
    interpreter's shutdown can abort the process."""

    def loop() -> None:
        try:
            while not _QUIT.wait(period):
                if not still_running():
                    return
        except (NarrativeError, OSError) as exc:
            log.debug("%s: no longer kept awake: %s", name, exc)
        finally:
            _AWAKE.discard(threading.current_thread())

    thread = threading.Thread(target=loop, name=name, daemon=True)
    _AWAKE.add(thread)
    thread.start()
    return thread


_QUIT = threading.Event()
_AWAKE: set[threading.Thread] = set()


@atexit.register
def _end_keep_awake() -> None:
    _QUIT.set()
    for thread in list(_AWAKE):
        thread.join(timeout=10)


_SESSIONS_FILE = "sessions"


def record_session(context: ProviderContext, session: str) -> None:
    """Note beside the environment's record (on this machine) that it spawned a process in
    ``session``: once Daytona forgets the session (ended by ``end_leftovers``, or with a
    stop), its handle is a process that ended, for every provider instance, and not one never
    issued."""
    state = env_state_dir(context.store, context.env_id)
    os.makedirs(state, exist_ok=True)
    with open(os.path.join(state, _SESSIONS_FILE), "a", encoding="ascii") as f:
        f.write(session + "\n")  # one short line: appended whole


def session_recorded(context: ProviderContext, session: str) -> bool:
    """Whether :func:`record_session` noted ``session``."""
    state = env_state_dir(context.store, context.env_id)
    try:
        with open(os.path.join(state, _SESSIONS_FILE), encoding="ascii") as f:
            return session in f.read().split()
    except FileNotFoundError:
        return False
