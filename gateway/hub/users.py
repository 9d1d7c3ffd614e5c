"""The users of a shared team hub: one-time invites, per-user credentials, roles, revocation,
and the audit log of every control action.

Everything lives in the hub store's private team directory (``<store>/narrative/team``, mode
0700): ``users.json`` (mode 0600, replaced atomically under the store's ``team`` lock, so the
hub and a ``narrative hub invite`` on the hub's machine can both write it) and ``audit.jsonl``
(one JSON line per action, appended).

Secrets are never stored: an invite code and a credential read ``<prefix>_<id>_<secret>``; the
file keeps the id and the SHA-256 of the secret, compared in constant time. An invite is good
once, until it expires; a credential until its user logs out or is revoked.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gateway.errors import AccessDenied, TokenInvalid, TokenRevoked
from narrative.errors import InvalidInput
from narrative.fsutil import write_atomic
from narrative.jsonio import load_json, parse_json
from narrative.models import now_iso
from narrative.store import Store

__all__ = [
    "OWNER",
    "ROLES",
    "AuditLog",
    "Credential",
    "UserRegistry",
    "check_user_name",
    "team_dir",
]

#: Roles: a member sees and controls only their own runs; an admin sees and controls all.
ROLES = ("member", "admin")
_INVITE_PREFIX = "ninv"
_CREDENTIAL_PREFIX = "ncred"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
#: Who the audit log names for actions taken with the store's own key on the hub's machine.
OWNER = "owner"
_ID_RE = re.compile(r"^[0-9a-f]{16}$")


def team_dir(store: Store) -> str:
    """The store's private directory of team users and the audit log."""
    return os.path.join(store.git_dir, "narrative", "team")


def _private_dir(store: Store) -> str:
    directory = team_dir(store)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    return directory


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _split(code: str, prefix: str, what: str) -> tuple[str, str]:
    parts = code.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != prefix or not _ID_RE.match(parts[1]) or not parts[2]:
        raise TokenInvalid(f"malformed {what}")
    return parts[1], parts[2]


def check_user_name(name: str) -> str:
    """``name`` if it is a valid user name.

    Raises:
        InvalidInput: it is not (lower-case letters, digits, ``-``, ``_``; 32 at most).
    """
    if not _NAME_RE.match(name) or name == OWNER:
        raise InvalidInput(
            f"invalid user name {name!r} (lower-case letters, digits, '-' and '_', "
            f"starting with a letter, 32 at most; not {OWNER!r})"
        )
    return name


@dataclass(frozen=True, slots=True)
class Credential:
    """A verified credential: its id and its user's name and role."""

    id: str
    user: str
    role: str


class UserRegistry:
    """The users, credentials and invites of one hub store.

    Reads are served from memory and reloaded when the file changed (the hub's machine may
    invite or revoke from another process); every change is made under the store's ``team``
    lock on the file as it is on disk.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.path = os.path.join(team_dir(store), "users.json")
        self._stamp: tuple[int, int] | None = None
        self._data: dict[str, Any] = _empty()

    # -- persistence ----------------------------------------------------------------------------

    def _read(self) -> dict[str, Any]:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._data = None, _empty()
            return self._data
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp != self._stamp:
            with open(self.path, "rb") as f:
                data = load_json(f)
            self._data = {**_empty(), **data} if isinstance(data, dict) else _empty()
            self._stamp = stamp
        return self._data

    @contextlib.contextmanager
    def _changing(self) -> Iterator[dict[str, Any]]:
        _private_dir(self.store)
        with self.store.lock("team", timeout=30.0):
            self._stamp = None  # always read what is on disk under the lock
            data = copy.deepcopy(self._read())  # the cached document stays as it was
            yield data
            encoded = json.dumps(data, indent=1, sort_keys=True).encode()
            write_atomic(self.path, encoded)
            os.chmod(self.path, 0o600)
            self._stamp = None

    # -- invites --------------------------------------------------------------------------------

    def invite(self, user: str, role: str, ttl: float) -> str:
        """A one-time code that ``narrative hub login`` trades for a credential of ``user``
        (created at login with ``role``), good for ``ttl`` seconds."""
        check_user_name(user)
        if role not in ROLES:
            raise InvalidInput(f"unknown role {role!r} (one of {', '.join(ROLES)})")
        if ttl <= 0:
            raise InvalidInput("an invite's time-to-live must be positive")
        invite_id, secret = secrets.token_hex(8), secrets.token_urlsafe(24)
        now = time.time()
        with self._changing() as data:
            invites = data["invites"]
            for old in [i for i, v in invites.items() if v["expires"] < now or v["used"]]:
                del invites[old]  # spent or expired: nothing to keep them for
            invites[invite_id] = {
                "user": user,
                "role": role,
                "hash": _digest(secret),
                "created": now_iso(),
                "expires": now + ttl,
                "used": None,
            }
        return f"{_INVITE_PREFIX}_{invite_id}_{secret}"

    def check_invite(self, code: str, now: float | None = None) -> tuple[str, str]:
        """The user and role of a valid invite ``code`` (unused, unexpired).

        Raises:
            TokenInvalid: unknown or wrong code; TokenRevoked: used; TokenExpired: expired.
        """
        return _valid_invite(self._read(), code, now)

    def redeem(self, code: str) -> tuple[Credential, str]:
        """Spend the invite ``code`` (once: a second redemption is refused) and create its
        user's credential; the credential and its secret form (``ncred_<id>_<secret>``)."""
        invite_id, _ = _split(code, _INVITE_PREFIX, "invite code")
        with self._changing() as data:
            user, role = _valid_invite(data, code, None)  # under the lock: one redemption wins
            data["invites"][invite_id]["used"] = now_iso()
            record = data["users"].setdefault(user, {"created": now_iso(), "lastSeen": None})
            record.update(role=role, revoked=None)
            cred_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
            data["credentials"][cred_id] = {
                "user": user,
                "hash": _digest(secret),
                "created": now_iso(),
                "lastSeen": None,
                "revoked": None,
            }
        return Credential(cred_id, user, role), f"{_CREDENTIAL_PREFIX}_{cred_id}_{secret}"

    # -- credentials ----------------------------------------------------------------------------

    def check_credential(self, text: str) -> Credential:
        """The credential ``text`` presents, if it is valid and neither it nor its user is
        revoked.

        Raises:
            TokenInvalid: unknown or wrong; TokenRevoked: revoked (or its user is).
        """
        cred_id, secret = _split(text, _CREDENTIAL_PREFIX, "credential")
        record = self._read()["credentials"].get(cred_id)
        if record is None or not hmac.compare_digest(_digest(secret), str(record["hash"])):
            raise TokenInvalid("unknown credential")
        return self.active(cred_id)

    def active(self, cred_id: str) -> Credential:
        """The credential ``cred_id`` if it and its user are still in force.

        Raises:
            TokenRevoked: it, or its user, was revoked (or it is unknown).
        """
        data = self._read()
        record = data["credentials"].get(cred_id)
        if record is None or record["revoked"]:
            raise TokenRevoked("this credential was revoked (log in again with a new invite)")
        user = data["users"].get(record["user"])
        if user is None or user.get("revoked"):
            raise TokenRevoked(f"user {record['user']} was revoked")
        return Credential(cred_id, str(record["user"]), str(user["role"]))

    def seen(self, credential: Credential) -> None:
        """Record that ``credential`` was just used (the user list's last seen)."""
        with self._changing() as data:
            stamp = now_iso()
            data["credentials"][credential.id]["lastSeen"] = stamp
            data["users"][credential.user]["lastSeen"] = stamp

    def revoke_credential(self, cred_id: str) -> None:
        """Void one credential (a logout)."""
        with self._changing() as data:
            record = data["credentials"].get(cred_id)
            if record is not None and not record["revoked"]:
                record["revoked"] = now_iso()

    def revoke_user(self, user: str) -> frozenset[str]:
        """Revoke ``user`` and every credential of theirs; the credential ids.

        Raises:
            InvalidInput: no such user.
        """
        with self._changing() as data:
            record = data["users"].get(user)
            if record is None:
                raise InvalidInput(f"no user {user!r} on this hub")
            stamp = now_iso()
            record["revoked"] = record.get("revoked") or stamp
            ids = [i for i, c in data["credentials"].items() if c["user"] == user]
            for cred_id in ids:
                data["credentials"][cred_id]["revoked"] = (
                    data["credentials"][cred_id]["revoked"] or stamp
                )
            for invite in data["invites"].values():  # pending invites of theirs too
                if invite["user"] == user and not invite["used"]:
                    invite["used"] = f"revoked {stamp}"
        return frozenset(ids)

    def users(self) -> list[dict[str, Any]]:
        """Every user: name, role, created, last seen, revoked (None while in force)."""
        self._stamp = None
        data = self._read()
        return [
            {
                "name": name,
                "role": record["role"],
                "created": record["created"],
                "lastSeen": record.get("lastSeen"),
                "revoked": record.get("revoked"),
            }
            for name, record in sorted(data["users"].items())
        ]

    def role(self, user: str) -> str | None:
        """The role of ``user`` (None: no such user, or revoked)."""
        record = self._read()["users"].get(user)
        return None if record is None or record.get("revoked") else str(record["role"])

    def require_user(self, user: str) -> None:
        """Raises AccessDenied unless ``user`` is a user in force."""
        if self.role(user) is None:
            raise AccessDenied(f"{user} is not a user of this hub")


def _valid_invite(data: dict[str, Any], code: str, now: float | None) -> tuple[str, str]:
    invite_id, secret = _split(code, _INVITE_PREFIX, "invite code")
    invite = data["invites"].get(invite_id)
    if invite is None or not hmac.compare_digest(_digest(secret), str(invite["hash"])):
        raise TokenInvalid("unknown invite code")
    if invite["used"]:
        raise TokenRevoked("this invite code was already used")
    if (time.time() if now is None else now) >= float(invite["expires"]):
        raise TokenRevoked("this invite code has expired; ask for a new one")
    return str(invite["user"]), str(invite["role"])


def _empty() -> dict[str, Any]:
    return {"users": {}, "credentials": {}, "invites": {}}


class AuditLog:
    """The hub's audit log: one JSON line per control action (time, user, action, target,
    outcome), appended to ``audit.jsonl`` in the team directory (mode 0600)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.path = os.path.join(team_dir(store), "audit.jsonl")

    def record(self, user: str, action: str, target: str | None, outcome: str) -> None:
        """Append one entry (``outcome``: ``ok`` or ``refused: <reason>``)."""
        entry = {
            "time": now_iso(),
            "user": user,
            "action": action,
            "target": target,
            "outcome": outcome,
        }
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        _private_dir(self.store)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)  # one write of one line: appends never interleave
        finally:
            os.close(fd)

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, oldest first (a torn last line, from a crash mid-append, is skipped)."""
        try:
            with open(self.path, "rb") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        found = []
        for line in lines:
            with contextlib.suppress(ValueError):
                entry = parse_json(line)
                if isinstance(entry, dict):
                    found.append(entry)
        return found
