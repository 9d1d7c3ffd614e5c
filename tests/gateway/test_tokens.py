"""Run-scoped HMAC tokens and the key file."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from gateway.errors import AuthError, TokenExpired, TokenInvalid, TokenMissing, WrongAudience
from gateway.tokens import (
    CLOCK_SKEW_TOLERANCE,
    TokenSigner,
    is_expired,
    load_or_create_key,
    parse_ttl,
)


@pytest.fixture
def signer(tmp_path: Path) -> TokenSigner:
    return TokenSigner(load_or_create_key(tmp_path / "store" / "gateway.key"))


def test_issue_and_verify(signer: TokenSigner) -> None:
    token = signer.issue("run-1", "sandbox", 60, now=1000.0)
    claims = signer.verify(token, run_id="run-1", now=1059.0)
    assert (claims.run_id, claims.environment_id, claims.expires_at) == ("run-1", "sandbox", 1060.0)


def test_expiry_tolerates_a_few_seconds_of_clock_skew(signer: TokenSigner) -> None:
    """A token checked on a host whose clock runs ahead of the issuer's is still good for
    :data:`CLOCK_SKEW_TOLERANCE` seconds past its expiry, and refused after that."""
    assert CLOCK_SKEW_TOLERANCE >= 3
    assert not is_expired(1000.0, now=1003.0)  # expired 3 s ago by this clock: accepted
    assert not is_expired(1000.0, now=1000.0 + CLOCK_SKEW_TOLERANCE - 0.001)
    assert is_expired(1000.0, now=1000.0 + CLOCK_SKEW_TOLERANCE)
    assert is_expired(1000.0, now=1000.0 + CLOCK_SKEW_TOLERANCE + 1)
    token = signer.issue("run-1", "sandbox", 60, now=1000.0)
    assert signer.verify(token, now=1063.0).run_id == "run-1"
    with pytest.raises(TokenExpired):
        signer.verify(token, now=1060.0 + CLOCK_SKEW_TOLERANCE + 1)


def test_a_subject_travels_in_the_token(signer: TokenSigner) -> None:
    token = signer.issue("user", "cli-1", 60, subject="c0ffee", now=1000.0)
    assert signer.verify(token, now=1001.0).subject == "c0ffee"
    assert signer.verify(signer.issue("run-1", "x", 60, now=1000.0), now=1001.0).subject == ""
    with pytest.raises(ValueError, match="subject"):
        signer.issue("user", "cli-1", 60, subject="no spaces")


def test_expired_forged_wrong_run_missing(signer: TokenSigner, tmp_path: Path) -> None:
    token = signer.issue("run-1", "sandbox", 60, now=1000.0)
    with pytest.raises(TokenExpired):
        signer.verify(token, now=1060.0 + CLOCK_SKEW_TOLERANCE)
    with pytest.raises(TokenInvalid, match="run"):
        signer.verify(token, run_id="run-2", now=1001.0)
    other = TokenSigner(load_or_create_key(tmp_path / "other.key"))
    with pytest.raises(TokenInvalid, match="signature"):
        other.verify(token, now=1001.0)
    prefix, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["exp"] = 9e12  # extend its life: the signature no longer matches
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(TokenInvalid, match="signature"):
        signer.verify(f"{prefix}.{forged}.{sig}", now=1001.0)
    for bad in (
        "x",
        "ng1.a",
        "ng1.a.b.c",
        "ng3." + body + "." + sig,
        token + "x" * 3000,
        "ng1.%%.!!",
    ):
        with pytest.raises(TokenInvalid):
            signer.verify(bad, now=1001.0)
    with pytest.raises(TokenInvalid, match="ng1 is no longer accepted"):
        signer.verify("ng1." + body + "." + sig, now=1001.0)
    for missing in (None, ""):
        with pytest.raises(TokenMissing):
            signer.verify(missing)
    with pytest.raises(ValueError):
        signer.issue("run 1", "x", 60)
    with pytest.raises(ValueError):
        signer.issue("run", "x", 0)


def test_audiences_sign_with_their_own_keys(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "gateway.key")
    hub, gateway = TokenSigner(key, "hub"), TokenSigner(key, "gateway")
    hub_token = hub.issue("run-1", "sandbox", 60, now=1000.0)
    assert hub.verify(hub_token, now=1001.0).audience == "hub"
    with pytest.raises(WrongAudience, match="a hub token is not accepted here"):
        gateway.verify(hub_token, now=1001.0)
    with pytest.raises(WrongAudience, match="a gateway token"):
        hub.verify(gateway.issue("run-1", "sandbox", 60, now=1000.0), now=1001.0)
    with pytest.raises(ValueError, match="audience"):
        TokenSigner(key, "everyone")


def test_scopes_and_token_ids_travel_in_the_claims(signer: TokenSigner) -> None:
    token = signer.issue(
        "run-1",
        "sandbox",
        60,
        read_snapshots=["snap-1"],
        read_threads=["thr-1"],
        write_threads=["thr-1"],
        create_threads=True,
        now=1000.0,
    )
    claims = signer.verify(token, now=1001.0)
    assert claims.read_snapshots == {"snap-1"} and claims.read_threads == {"thr-1"}
    assert claims.write_threads == {"thr-1"} and claims.create_threads
    bare = signer.verify(signer.issue("run-1", "sandbox", 60, now=1000.0), now=1001.0)
    assert not (bare.read_snapshots or bare.read_threads or bare.write_threads)
    assert not bare.create_threads and bare.token_id != claims.token_id
    with pytest.raises(ValueError, match="thread"):
        signer.issue("run-1", "sandbox", 60, write_threads=["../x"])


def test_key_file_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "s" / "gateway.key"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) == 32 and load_or_create_key(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["gateway.key"]  # no temp left over


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gateway.key"
    load_or_create_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(AuthError, match="chmod 600"):
        load_or_create_key(path)
    link = tmp_path / "link.key"
    os.chmod(path, 0o600)
    link.symlink_to(path)
    with pytest.raises(AuthError):
        load_or_create_key(link)
    short = tmp_path / "short.key"
    short.write_bytes(b"abc")
    os.chmod(short, 0o600)
    with pytest.raises(AuthError, match="32-byte"):
        load_or_create_key(short)


def test_racing_creators_agree_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "gateway.key"
    keys: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: keys.append(load_or_create_key(path))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and len(keys) == 8


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604800)]
)
def test_parse_ttl(text: str, seconds: float) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "1y", "-5m", "h"])
def test_parse_ttl_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ttl(text)
