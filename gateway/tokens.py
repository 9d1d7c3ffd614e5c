"""Least-privilege connection tokens: HMAC-SHA256 over the claims, with a key kept on disk.

A token reads ``ng2.<claims>.<signature>`` (both parts base64url, unpadded). Its claims say
who may use it and for what:

* ``aud``: the audience, ``gateway`` (a ``narrative gateway serve`` node) or ``hub`` (a hub or
  runtime). Each audience signs with its own key, derived from the key file with a distinct
  label, so a token for one audience does not even verify at the other.
* ``run``, ``env``: the run and the environment it is scoped to.
* ``exp``: its expiry (tokens are short-lived; a hub renews its runtimes' tokens).
* ``jti``: a random token id, for logs and revocation.
* ``read``: the snapshots and threads the holder may fetch (a run's input).
* ``write``: the threads it may write (a run's result thread) and whether it may create new
  threads (its nested runs' threads).

The key is 32 random bytes in a file created on first use with mode 0600 (exclusively, so two
processes racing to create it agree on one key); a key file that others can read is refused
rather than trusted. Verification is constant-time and checks the signature before trusting
the claims. Tokens of the older ``ng1`` format are refused with a message saying so.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from narrative.jsonio import parse_json

from .errors import AuthError, TokenExpired, TokenInvalid, TokenMissing, WrongAudience

__all__ = [
    "AUDIENCES",
    "CLOCK_SKEW_TOLERANCE",
    "TokenClaims",
    "TokenSigner",
    "load_or_create_key",
    "is_expired",
    "parse_ttl",
    "token_audience",
]

_PREFIX = "ng2"
_OLD_PREFIXES = ("ng1",)
_KEY_BYTES = 32
_MAX_TOKEN = 4096
_MAX_SCOPE = 64
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Who a token is for: a stand-alone gateway node, or a hub (and the runtimes it starts).
AUDIENCES = ("gateway", "hub")
#: Seconds past its expiry a token is still accepted: the host that issued it and the host that
#: checks it may disagree on the time by a few seconds (a team hub and its developers' machines).
CLOCK_SKEW_TOLERANCE = 5.0


def is_expired(expires_at: float, now: float | None = None) -> bool:
    """Whether a token expiring at ``expires_at`` is refused at ``now`` (default: the time now),
    allowing :data:`CLOCK_SKEW_TOLERANCE` seconds of clock skew between hosts."""
    return (time.time() if now is None else now) >= expires_at + CLOCK_SKEW_TOLERANCE


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a verified token says.

    Attributes:
        run_id: The run the token is scoped to.
        environment_id: The environment allowed to connect with it.
        expires_at: Unix time after which it is refused.
        audience: ``gateway`` or ``hub``.
        token_id: Random id of this token (for logs and revocation).
        read_snapshots: Snapshots the holder may fetch.
        read_threads: Threads whose records (and heads) the holder may fetch.
        write_threads: Threads the holder may write (its result thread).
        create_threads: Whether the holder may create new threads (its nested runs' threads).
        subject: Who the token was issued to beyond its run (a team hub's user sessions: the
            credential the session derives from); empty for run tokens.
    """

    run_id: str
    environment_id: str
    expires_at: float
    audience: str = "gateway"
    token_id: str = ""
    read_snapshots: frozenset[str] = frozenset()
    read_threads: frozenset[str] = frozenset()
    write_threads: frozenset[str] = frozenset()
    create_threads: bool = False
    subject: str = ""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_or_create_key(path: str | Path) -> bytes:
    """The signing key at ``path``, created (mode 0600, parents as needed) if absent.

    Raises:
        AuthError: the file is readable or writable by others, or not a valid key.
    """
    path = Path(path)
    if not path.exists():
        _create_key(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise AuthError(f"cannot open gateway key {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AuthError(f"gateway key {path} is not a regular file")
        if info.st_mode & 0o077:
            raise AuthError(
                f"gateway key {path} is accessible to others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}); chmod 600 it"
            )
        key = os.read(fd, _KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != _KEY_BYTES:
        raise AuthError(f"gateway key {path} is not a {_KEY_BYTES}-byte key")
    return key


def _create_key(path: Path) -> None:
    # Written in full under a temporary name, then hard-linked into place: the key file never
    # exists half-written, and when two processes race, the first link wins and both use it.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, secrets.token_bytes(_KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def parse_ttl(text: str) -> float:
    """Seconds in a duration like ``90``, ``90s``, ``15m``, ``1h`` or ``7d``.

    Raises:
        ValueError: not a positive duration.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 1h, 7d)")
    seconds = float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
    if seconds <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return seconds


def token_audience(token: str) -> str | None:
    """The audience a token claims, read without verifying (for error messages only)."""
    try:
        data = parse_json(_unb64(token.split(".")[1]))
    except (IndexError, ValueError, binascii.Error):
        return None
    aud = data.get("aud") if isinstance(data, dict) else None
    return aud if isinstance(aud, str) else None


def _scope(values: Iterable[str], what: str) -> list[str]:
    found = sorted(set(values))
    if len(found) > _MAX_SCOPE:
        raise ValueError(f"too many {what} in one token ({len(found)})")
    for value in found:
        if not _ID_RE.match(value):
            raise ValueError(f"malformed {what[:-1]} id: {value!r}")
    return found


def _strings(value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError("a scope must be a list of ids")
    return frozenset(value)


class TokenSigner:
    """Issues and verifies the tokens of one audience.

    Args:
        key: The key file's key (see :func:`load_or_create_key`); the signer derives its own
            key from it for ``audience``, so tokens of another audience never verify here.
        audience: ``gateway`` or ``hub``.
    """

    def __init__(self, key: bytes, audience: str = "gateway") -> None:
        if len(key) < 16:
            raise ValueError("gateway key too short")
        if audience not in AUDIENCES:
            raise ValueError(f"unknown token audience {audience!r} (one of {AUDIENCES})")
        self.audience = audience
        label = b"narrative token key: " + audience.encode()
        self._key = hmac.new(key, label, hashlib.sha256).digest()

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, _PREFIX.encode() + b"." + body, hashlib.sha256).digest()

    def issue(
        self,
        run_id: str,
        environment_id: str,
        ttl: float,
        *,
        read_snapshots: Iterable[str] = (),
        read_threads: Iterable[str] = (),
        write_threads: Iterable[str] = (),
        create_threads: bool = False,
        subject: str = "",
        now: float | None = None,
    ) -> str:
        """A token letting ``environment_id`` connect for run ``run_id`` for ``ttl`` seconds,
        allowed to read and write what the scopes name (nothing by default).

        Raises:
            ValueError: an id is malformed, a scope too large, or ``ttl`` is not positive.
        """
        for what, value in (("run id", run_id), ("environment id", environment_id)):
            if not _ID_RE.match(value):
                raise ValueError(f"malformed {what}: {value!r}")
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        exp = (time.time() if now is None else now) + ttl
        data = {
            "aud": self.audience,
            "run": run_id,
            "env": environment_id,
            "exp": round(exp, 3),
            "jti": secrets.token_hex(8),
            "read": {
                "snapshots": _scope(read_snapshots, "snapshots"),
                "threads": _scope(read_threads, "threads"),
            },
            "write": {"threads": _scope(write_threads, "threads"), "create": create_threads},
        }
        if subject:
            if not _ID_RE.match(subject):
                raise ValueError(f"malformed subject: {subject!r}")
            data["sub"] = subject
        body = _b64(json.dumps(data, separators=(",", ":")).encode()).encode()
        return f"{_PREFIX}.{body.decode()}.{_b64(self._mac(body))}"

    def verify(
        self, token: str | None, *, run_id: str | None = None, now: float | None = None
    ) -> TokenClaims:
        """Check ``token`` and return its claims.

        Args:
            token: The presented token (None or empty: missing).
            run_id: When given, the token must be scoped to this run.
            now: The current time (for tests).

        Raises:
            TokenMissing: no token.
            TokenInvalid: malformed, an old format, bad signature, or another run.
            WrongAudience: a valid-looking token for the other audience.
            TokenExpired: past its expiry.
        """
        if not token:
            raise TokenMissing("no token presented")
        parts = token.split(".")
        if parts[0] in _OLD_PREFIXES:
            raise TokenInvalid(
                f"token format {parts[0]} is no longer accepted (tokens are {_PREFIX} now): "
                "ask for a new token"
            )
        if len(token) > _MAX_TOKEN or len(parts) != 3 or parts[0] != _PREFIX:
            raise TokenInvalid("malformed token")
        body, sig = parts[1].encode("ascii", "replace"), parts[2]
        try:
            given = _unb64(sig)
        except (binascii.Error, ValueError):
            raise TokenInvalid("malformed token") from None
        if not hmac.compare_digest(given, self._mac(body)):
            claimed = token_audience(token)
            if claimed in AUDIENCES and claimed != self.audience:
                raise WrongAudience(
                    f"a {claimed} token is not accepted here (this server takes {self.audience} "
                    "tokens)"
                )
            raise TokenInvalid("token signature does not verify")
        try:
            data = parse_json(_unb64(parts[1]))
            read, write = data["read"], data["write"]
            claims = TokenClaims(
                run_id=str(data["run"]),
                environment_id=str(data["env"]),
                expires_at=float(data["exp"]),
                audience=str(data["aud"]),
                token_id=str(data["jti"]),
                read_snapshots=_strings(read["snapshots"]),
                read_threads=_strings(read["threads"]),
                write_threads=_strings(write["threads"]),
                create_threads=write["create"] is True,
                subject=str(data.get("sub", "")),
            )
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise TokenInvalid("malformed token claims") from None
        if claims.audience != self.audience:  # same key, other label: cannot happen, but cheap
            raise WrongAudience(f"token is for the {claims.audience}, not the {self.audience}")
        if is_expired(claims.expires_at, now):
            raise TokenExpired(f"token for {claims.environment_id} expired")
        if run_id is not None and claims.run_id != run_id:
            raise TokenInvalid(f"token is for run {claims.run_id!r}, not {run_id!r}")
        return claims
