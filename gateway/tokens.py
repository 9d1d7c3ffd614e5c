"""Run-scoped connection tokens: HMAC-SHA256 over ``{run, env, exp}``, with a key kept on disk.

A token reads ``ng1.<claims>.<signature>`` (both parts base64url, unpadded). The key is 32
random bytes in a file created on first use with mode 0600 (exclusively, so two processes
racing to create it agree on one key); a key file that others can read is refused rather than
trusted. Verification is constant-time and checks the signature before looking at the claims.
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
from dataclasses import dataclass
from pathlib import Path

from .errors import AuthError, TokenExpired, TokenInvalid, TokenMissing

__all__ = ["TokenClaims", "TokenSigner", "load_or_create_key", "parse_ttl"]

_PREFIX = "ng1"
_KEY_BYTES = 32
_MAX_TOKEN = 2048
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a verified token says.

    Attributes:
        run_id: The run the token is scoped to.
        environment_id: The environment allowed to connect with it.
        expires_at: Unix time after which it is refused.
    """

    run_id: str
    environment_id: str
    expires_at: float


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


class TokenSigner:
    """Issues and verifies tokens with one key.

    Args:
        key: The HMAC key (see :func:`load_or_create_key`).
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("gateway key too short")
        self._key = key

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, _PREFIX.encode() + b"." + body, hashlib.sha256).digest()

    def issue(
        self, run_id: str, environment_id: str, ttl: float, *, now: float | None = None
    ) -> str:
        """A token letting ``environment_id`` connect for run ``run_id`` for ``ttl`` seconds.

        Raises:
            ValueError: an id is malformed or ``ttl`` is not positive.
        """
        for what, value in (("run id", run_id), ("environment id", environment_id)):
            if not _ID_RE.match(value):
                raise ValueError(f"malformed {what}: {value!r}")
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        exp = (time.time() if now is None else now) + ttl
        claims = json.dumps(
            {"run": run_id, "env": environment_id, "exp": round(exp, 3)}, separators=(",", ":")
        ).encode()
        body = _b64(claims).encode()
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
            TokenInvalid: malformed, bad signature, or another run.
            TokenExpired: past its expiry.
        """
        if not token:
            raise TokenMissing("no token presented")
        parts = token.split(".")
        if len(token) > _MAX_TOKEN or len(parts) != 3 or parts[0] != _PREFIX:
            raise TokenInvalid("malformed token")
        body, sig = parts[1].encode("ascii", "replace"), parts[2]
        try:
            given = _unb64(sig)
        except (binascii.Error, ValueError):
            raise TokenInvalid("malformed token") from None
        if not hmac.compare_digest(given, self._mac(body)):
            raise TokenInvalid("token signature does not verify")
        try:
            data = json.loads(_unb64(parts[1]))
            claims = TokenClaims(str(data["run"]), str(data["env"]), float(data["exp"]))
        except (ValueError, KeyError, TypeError, binascii.Error, RecursionError):
            raise TokenInvalid("malformed token claims") from None
        if (time.time() if now is None else now) >= claims.expires_at:
            raise TokenExpired(f"token for {claims.environment_id} expired")
        if run_id is not None and claims.run_id != run_id:
            raise TokenInvalid(f"token is for run {claims.run_id!r}, not {run_id!r}")
        return claims
