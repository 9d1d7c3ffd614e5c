"""The e2b provider through the real e2b SDK, against the local envd stand-in (E2B_DEBUG), beyond
the provider contract (``test_contract.py``): debug mode, credentials, error translation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from e2b import (
    AuthenticationException,
    FileNotFoundException,
    InvalidArgumentException,
    RateLimitException,
)
from e2b.exceptions import (
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxUnreachableException,
)
from pydantic import ValidationError

from narrative.errors import InvalidInput
from narrative.snapshot import take_snapshot
from narrative.store import Store
from providers.base import RUNTIME_BOOTSTRAP, Health
from providers.e2b_calls import translate_error
from providers.e2b_provider import E2BProvider
from providers.errors import ProviderError, ProviderUnavailable, ResourceGone, RuntimeBroken
from providers.registry import get_provider_class
from tests.providers.e2b_support import (  # noqa: F401  (fixtures)
    WORKDIR,
    envd_fixture,
    envd_server_fixture,
    make_provider,
    on_disk,
)
from tests.providers.envd_standin import EnvdStandIn

pytestmark = pytest.mark.timeout(60)


def test_registry_and_capabilities() -> None:
    assert get_provider_class("e2b") is E2BProvider
    config = E2BProvider.config_model.model_validate({"type": "e2b", "extra_capabilities": ["gpu"]})
    caps = E2BProvider.capabilities_for(config)
    assert {"python", "exec", "files", "network", "isolation", "gpu"} <= caps
    assert E2BProvider.category == "cloud"
    with pytest.raises(ValidationError):
        E2BProvider.config_model.model_validate({"type": "e2b", "workdir": "relative"})
    with pytest.raises(ValidationError):
        E2BProvider.config_model.model_validate({"type": "e2b", "api_key_env": "e2b_123 key"})


def test_exec_env_cwd_quoting_and_missing_programs(envd: EnvdStandIn, store: Store) -> None:
    provider = make_provider(store, env={"FROM_CONFIG": "c"})
    rid = provider.create()
    assert rid == "debug_sandbox_id"
    result = provider.exec(
        rid, ["sh", "-c", 'echo "$FROM_CONFIG $FROM_CALL"; pwd'], env={"FROM_CALL": "x y"}
    )
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "c x y"
    assert lines[1].endswith("/home/user/workspace")  # cwd is the workdir
    # Arguments are passed through the sandbox shell exactly (quoting survives).
    ok = provider.exec(rid, ["printf", "%s|", "a b", "$HOME", "it's"])
    assert (ok.exit_code, ok.stdout) == (0, b"a b|$HOME|it's|")
    missing = provider.exec(rid, ["definitely-not-a-command-xyz"])
    assert missing.exit_code == 127
    with pytest.raises(InvalidInput):
        provider.exec(rid, [])


def test_files_land_in_the_workdir_and_errors_keep_their_kind(
    envd: EnvdStandIn, store: Store
) -> None:
    provider = make_provider(store)
    rid = provider.create()
    blob = bytes(range(256)) * 64 + b"\x00\xff\r\n"
    provider.write_file(rid, "deep/dir/blob.bin", blob)
    assert on_disk(envd, f"{WORKDIR}/deep/dir/blob.bin").read_bytes() == blob
    assert provider.read_file(rid, "./deep/dir/../dir/blob.bin") == blob
    provider.delete_file(rid, "deep/dir/blob.bin")
    assert not on_disk(envd, f"{WORKDIR}/deep/dir/blob.bin").exists()
    with pytest.raises(FileNotFoundError):
        provider.read_file(rid, "deep/dir/blob.bin")
    with pytest.raises(FileNotFoundError):
        provider.delete_file(rid, "deep/dir/blob.bin")
    with pytest.raises(IsADirectoryError):
        provider.delete_file(rid, "deep")


def test_standin_refuses_symlinks_out_of_its_root(
    envd: EnvdStandIn, store: Store, tmp_path: Path
) -> None:
    secret = tmp_path / "host-secret"
    secret.mkdir()
    (secret / "key").write_text("host only")
    provider = make_provider(store)
    rid = provider.create()
    assert provider.exec(rid, ["ln", "-s", str(secret), "escape"]).exit_code == 0
    with pytest.raises(ProviderError) as info:
        provider.read_file(rid, "escape/key")
    assert "host only" not in str(info.value)
    with pytest.raises(ProviderError):
        provider.write_file(rid, "escape/planted", b"x")
    assert not (secret / "planted").exists()


def test_restore_and_collect_leave_no_staged_tars(envd: EnvdStandIn, store: Store) -> None:
    base = take_snapshot(store, message="base").snapshot
    provider = make_provider(store)
    rid = provider.create()
    provider.restore(rid, base)
    provider.exec(rid, ["sh", "-c", "echo changed > README.md"])
    provider.collect(rid, store.config.default_thread, None, "collect changed")
    leftovers = list(on_disk(envd, "/home/user/.narrative-staging").iterdir())
    assert leftovers == [], "staged tars must be removed from the sandbox"


def test_reconnect_to_a_sandbox_that_never_was(envd: EnvdStandIn, store: Store) -> None:
    fresh = make_provider(store)
    with pytest.raises(ResourceGone):
        fresh.reconnect("sandbox-that-never-was")
    assert fresh.health("sandbox-that-never-was") is Health.GONE


PROXY_CONFIG = b'{"gateway": "ws://127.0.0.1:9000", "token": "${NARRATIVE_GATEWAY_TOKEN}"}\n'


def test_config_upload_on_create_and_start(
    envd: EnvdStandIn, store: Store, workspace: Path
) -> None:
    (workspace / "proxyExecution.json").write_bytes(PROXY_CONFIG)
    (workspace / "conf").mkdir()
    (workspace / "conf" / "tool.toml").write_text("[tool]\nname = 'x'\n")
    provider = make_provider(store, upload=["proxyExecution.json", "conf/tool.toml"])
    rid = provider.create()
    uploaded = on_disk(envd, f"{WORKDIR}/proxyExecution.json")
    assert uploaded.read_bytes() == PROXY_CONFIG
    assert on_disk(envd, f"{WORKDIR}/conf/tool.toml").read_text() == "[tool]\nname = 'x'\n"
    uploaded.unlink()
    provider.start(rid)
    assert uploaded.read_bytes() == PROXY_CONFIG
    # A restore of a snapshot that lacks the (ignored) config keeps it in place.
    (workspace / ".gitignore").write_text("proxyExecution.json\n")
    snapshot = take_snapshot(store, message="without config").snapshot
    provider.restore(rid, snapshot)
    assert uploaded.read_bytes() == PROXY_CONFIG


@pytest.mark.parametrize(
    "path",
    [
        ".env",
        ".env.local",
        "conf/prod.env",
        "certs/server.pem",
        "tls.key",
        "id_rsa",
        "keys/id_ed25519.pub",
        ".aws/credentials",
        ".ssh/config",
        ".netrc",
        ".npmrc",
        ".pypirc",
        ".git-credentials",
        ".config/gcloud/application_default_credentials.json",
        "../outside.json",
        "/etc/passwd",
    ],
)
def test_credential_files_refused_by_name(store: Store, path: str) -> None:
    with pytest.raises(ValidationError):
        make_provider(store, upload=["proxyExecution.json", path])


@pytest.mark.parametrize(
    "content",
    [
        b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----\n",
        b'{"aws": "AKIAABCDEFGHIJKLMNOP"}',
        b'{"openai": "sk-proj-abcdefghijklmnopqrstuvwx"}',
        b'{"apiKey": "s3cr3t-value-123"}',
        b"password = hunter2hunter2\n",
        b'{"e2b": "e2b_0123456789abcdef0123456789"}',
        b"GITHUB=ghp_abcdefghijklmnopqrstuvwxyz0123456789\n",
    ],
)
def test_files_holding_keys_are_never_uploaded(
    envd: EnvdStandIn, store: Store, workspace: Path, content: bytes
) -> None:
    (workspace / "proxyExecution.json").write_bytes(PROXY_CONFIG)
    (workspace / "settings.json").write_bytes(content)
    provider = make_provider(store, upload=["proxyExecution.json", "settings.json"])
    with pytest.raises(InvalidInput) as info:
        provider.create()
    assert content.decode() not in str(info.value)  # the secret is not echoed either
    # All files are checked before any is sent: not even the harmless one arrived, and
    # nothing was made (before the sandbox was even created: none is left behind)
    assert not on_disk(envd, f"{WORKDIR}/settings.json").exists()
    assert not on_disk(envd, f"{WORKDIR}/proxyExecution.json").exists()
    assert not on_disk(envd, WORKDIR).exists()


def test_health_ok_then_gone_after_the_sandbox_is_killed(envd: EnvdStandIn, store: Store) -> None:
    provider = make_provider(store)
    rid = provider.create()
    assert provider.health(rid) is Health.OK
    provider.stop(rid)  # debug mode: no control plane to pause with; the sandbox keeps running
    assert provider.health(rid) is Health.OK
    assert provider.list_resources() == []  # debug mode: nothing to list from
    provider.delete(rid)
    # In debug mode the SDK's kill is a no-op; the stand-in plays the control plane's kill.
    envd.kill(rid)
    assert provider.health(rid) is Health.GONE
    assert make_provider(store).health(rid) is Health.GONE
    with pytest.raises(ResourceGone):
        provider.reconnect(rid)
    with pytest.raises(ResourceGone):
        provider.exec(rid, ["true"])
    with pytest.raises(ResourceGone):
        provider.read_file(rid, "anything")
    provider.delete(rid)  # idempotent on a gone sandbox


def test_kill_mid_command_is_resource_gone(envd: EnvdStandIn, store: Store) -> None:
    provider = make_provider(store)
    rid = provider.create()
    import threading

    timer = threading.Timer(0.5, envd.kill, args=(rid,))
    timer.start()
    try:
        with pytest.raises((ResourceGone, ProviderUnavailable)):
            provider.exec(rid, ["sleep", "20"], timeout=10)
    finally:
        timer.cancel()


def test_unreachable_envd_is_provider_unavailable(
    envd: EnvdStandIn, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    monkeypatch.setenv("E2B_SANDBOX_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("E2B_CONNECTION_RETRIES", "0")
    provider = make_provider(store)
    assert provider.health("debug_sandbox_id") is Health.UNREACHABLE
    with pytest.raises(ProviderUnavailable):
        provider.read_file("debug_sandbox_id", "x")


def test_sdk_errors_translated_in_one_place() -> None:
    gone = translate_error(SandboxNotRunningException("was not found"), "sb")
    assert isinstance(gone, ResourceGone)
    assert isinstance(translate_error(SandboxNotFoundException("nope"), "sb"), ResourceGone)
    auth = translate_error(AuthenticationException("bad key e2b_secret"), "sb")
    assert isinstance(auth, ProviderUnavailable) and "e2b_secret" not in str(auth)
    assert isinstance(translate_error(SandboxUnreachableException("x"), "sb"), ProviderUnavailable)
    assert isinstance(translate_error(RateLimitException("slow down"), "sb"), ProviderUnavailable)
    assert isinstance(translate_error(InvalidArgumentException("bad"), "sb"), InvalidInput)
    missing = translate_error(FileNotFoundException("no file"), "sb", "a.txt")
    assert isinstance(missing, FileNotFoundError) and "a.txt" in str(missing)
    other = ValueError("not an e2b error")
    assert translate_error(other, "sb") is other


def test_api_key_is_read_from_the_named_variable_and_never_persisted(
    envd: EnvdStandIn, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_E2B_KEY", "e2b_not_a_real_key_0000")
    provider = make_provider(store, api_key_env="MY_E2B_KEY")
    assert provider._opts() == {"api_key": "e2b_not_a_real_key_0000"}
    rid = provider.create()
    assert provider.exec(rid, ["true"]).exit_code == 0
    dumped = provider.cfg.model_dump_json()
    assert "e2b_not_a_real_key_0000" not in dumped and "MY_E2B_KEY" in dumped


def test_health_runs_the_runtime_import_check(envd: EnvdStandIn, store: Store) -> None:
    """With a runtime configured, health runs ``narrative runtime --check`` in the sandbox: a
    workspace ``json.py`` that replaces a module of a runtime started among its files makes
    it broken; the isolated runtime is not fooled."""
    repo = str(Path(__file__).resolve().parents[2])
    exposed = make_provider(
        store, runtime=["env", f"PYTHONPATH={repo}", sys.executable, "-m", "cli"]
    )
    isolated = make_provider(store, runtime=[sys.executable, "-I", "-c", RUNTIME_BOOTSTRAP, repo])
    rid = exposed.create()
    assert exposed.health(rid) is Health.OK
    exposed.write_file(rid, "json.py", b"raise SystemExit('planted json.py ran')\n")
    with pytest.raises(RuntimeBroken, match=r"broken: planted json\.py ran"):
        exposed.health(rid)
    assert isolated.health(rid) is Health.OK
