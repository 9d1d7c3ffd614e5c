"""Who may use the web view: one-time login codes (``narrative hub ui`` asks the hub for one
with the owner's control token, as Jupyter prints a URL with a token), the sessions they turn
into (an HttpOnly, SameSite=Strict cookie), and the CSRF token every form posts back.

Codes and sessions live in the hub's memory only: a restarted hub forgets them (log in again),
and nothing secret is ever written into a page but the session's own CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

__all__ = ["SESSION_COOKIE", "LoginCodes", "Session", "Sessions"]

SESSION_COOKIE = "narrative_session"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class LoginCodes:
    """One-time login codes, each good once for ``ttl`` seconds (kept as digests)."""

    def __init__(self, ttl: float = 600.0) -> None:
        self.ttl = ttl
        self._codes: dict[str, tuple[str, float]] = {}

    def issue(self, user: str) -> str:
        """A new code that logs in as ``user``."""
        self._forget_expired()
        code = secrets.token_urlsafe(32)
        self._codes[_digest(code)] = (user, time.monotonic() + self.ttl)
        return code

    def redeem(self, code: str) -> str | None:
        """The user of ``code`` (None: unknown, used or expired); a code is good once."""
        self._forget_expired()
        found = self._codes.pop(_digest(code), None)
        return found[0] if found is not None else None

    def _forget_expired(self) -> None:
        now = time.monotonic()
        for key in [k for k, (_, expiry) in self._codes.items() if expiry < now]:
            del self._codes[key]


@dataclass
class Session:
    user: str
    csrf: str
    expires: float

    def check_csrf(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token, self.csrf)


class Sessions:
    """Logged-in browsers, by the secret in their cookie (kept as digests)."""

    def __init__(self, ttl: float = 12 * 3600.0) -> None:
        self.ttl = ttl
        self._sessions: dict[str, Session] = {}

    def open(self, user: str) -> tuple[str, Session]:
        """A new session for ``user``: the cookie's value and the session."""
        secret = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), time.monotonic() + self.ttl)
        self._sessions[_digest(secret)] = session
        return secret, session

    def get(self, secret: str | None) -> Session | None:
        if not secret:
            return None
        session = self._sessions.get(_digest(secret))
        if session is None or session.expires < time.monotonic():
            return None
        return session

    def close(self, secret: str | None) -> None:
        if secret:
            self._sessions.pop(_digest(secret), None)
