"""Team users in the hub store: invites, credentials, and the rate limit on failed logins."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.errors import TokenInvalid, TokenRevoked
from gateway.hub.client import revoke_user_on_hub
from gateway.hub.team import INVITE_RUN, LOGIN_FAILURE_LIMIT, TeamSigner, team_bearer
from gateway.hub.users import AuditLog, UserRegistry
from narrative.errors import InvalidInput
from narrative.store import Store


def test_an_invite_is_good_once_until_it_expires(store: Store) -> None:
    users = UserRegistry(store)
    code = users.invite("alice", "member", 60)
    assert users.check_invite(code) == ("alice", "member")
    prefix, invite_id, secret = code.split("_", 2)
    with pytest.raises(TokenInvalid):
        users.check_invite(f"{prefix}_{invite_id}_{'x' * len(secret)}")
    with pytest.raises(TokenRevoked, match="expired"):
        users.check_invite(code, now=time.time() + 61)
    credential, secret_form = users.redeem(code)
    assert (credential.user, credential.role) == ("alice", "member")
    assert users.check_credential(secret_form) == credential
    with pytest.raises(TokenRevoked, match="already used"):
        users.redeem(code)
    stored = Path(users.path).read_text()
    assert secret not in stored and secret_form.split("_", 2)[2] not in stored


def test_revoking_a_user_voids_credentials_and_pending_invites(store: Store) -> None:
    users = UserRegistry(store)
    _, first = users.redeem(users.invite("bob", "admin", 60))
    pending = users.invite("bob", "member", 60)
    assert len(users.revoke_user("bob")) == 1
    with pytest.raises(TokenRevoked):
        users.check_credential(first)
    with pytest.raises(TokenRevoked):
        users.check_invite(pending)
    with pytest.raises(InvalidInput, match="no user"):
        users.revoke_user("nobody")
    with pytest.raises(InvalidInput, match="invalid user name"):
        users.invite("owner", "member", 60)


def test_failed_logins_are_rate_limited(store: Store) -> None:
    users = UserRegistry(store)
    signer = TeamSigner(b"k" * 32, users, AuditLog(store))
    good = team_bearer("invite", users.invite("carol", "member", 60))
    assert signer.verify(good).run_id == INVITE_RUN
    for _ in range(LOGIN_FAILURE_LIMIT):
        with pytest.raises(TokenInvalid, match="unknown invite"):
            signer.verify(team_bearer("invite", "ninv_0123456789abcdef_guess"))
    with pytest.raises(TokenInvalid, match="too many failed logins"):
        signer.verify(good)  # even a good code, until the window passes
    refused = [e for e in AuditLog(store).entries() if e["outcome"].startswith("refused")]
    assert len(refused) == LOGIN_FAILURE_LIMIT


def test_revoking_without_a_serving_hub_changes_the_store(store: Store) -> None:
    users = UserRegistry(store)
    _, credential = users.redeem(users.invite("dana", "member", 60))
    assert asyncio.run(revoke_user_on_hub(store, "dana")) == 0
    with pytest.raises(TokenRevoked):
        UserRegistry(store).check_credential(credential)  # a hub started later reads it
    assert AuditLog(store).entries()[-1]["action"] == "revoke"
