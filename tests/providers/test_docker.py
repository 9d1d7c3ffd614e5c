"""The docker provider against a real Docker engine (DESIGN.md §5): an image built offline,
``network_mode=none``, never a pull. Skips without a daemon unless NARRATIVE_REQUIRE_DOCKER=1.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from narrative.errors import InvalidInput
from narrative.hierarchy import create_thread
from narrative.snapshot import take_snapshot
from narrative.store import Store
from providers.base import Health
from providers.errors import ExecFailed, ImageNotFound, ProviderUnavailable, ResourceGone
from tests.conftest import git
from tests.providers.test_shipping import entries

pytestmark = pytest.mark.heavy

MakeProvider = Callable[..., Any]


def running(make: MakeProvider, **config: Any) -> tuple[Any, str]:
    provider = make(**config)
    cid = provider.create()
    provider.start(cid)
    return provider, cid


def sh(provider: Any, cid: str, script: str, **kwargs: Any) -> Any:
    return provider.exec(cid, ["sh", "-c", script], **kwargs)


def new_thread(store: Store, name: str) -> str:
    return create_thread(store, store.config.default_objective, name).id


def store_state(store: Store) -> tuple[dict[str, bytes], list[str]]:
    packs = sorted(os.listdir(os.path.join(store.git_dir, "objects", "pack")))
    return store.thread_heads(), packs


# -- lifecycle ----------------------------------------------------------------------------------


def test_create_labels_without_starting(
    make_docker_provider: MakeProvider, docker_api: Any
) -> None:
    provider = make_docker_provider()
    cid = provider.create()
    info = docker_api.inspect_container(cid)
    assert info["State"]["Status"] == "created"
    labels = info["Config"]["Labels"]
    assert labels["narrative.owner"] == provider.context.owner
    assert labels["narrative.env"] == provider.context.env_id
    assert labels["narrative.name"] == "test-env"
    assert info["Config"]["WorkingDir"] == "/work"
    assert provider.list_resources() == [cid]
    other = make_docker_provider()
    assert other.list_resources() == []
    assert provider.health(cid) is Health.UNREACHABLE
    provider.start(cid)
    assert provider.health(cid) is Health.OK


def test_missing_image_is_refused_without_pull(
    make_docker_provider: MakeProvider, docker_api: Any
) -> None:
    provider = make_docker_provider(image="narrative-absent/never:1")
    # Every request the provider makes is recorded: a pull (POST /images/create) must not be
    # among them; with no registry reachable, a failed pull would leave no event behind.
    requests_made: list[tuple[str, str]] = []
    send = provider.api.request

    def record(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        requests_made.append((method, url))
        return send(method, url, *args, **kwargs)

    provider.api.request = record
    since = int(time.time()) - 1
    with pytest.raises(ImageNotFound) as info:
        provider.create()
    assert requests_made, "the provider's requests were not observed"
    assert not [url for _method, url in requests_made if "/images/create" in url]
    assert not [url for _method, url in requests_made if "/containers/create" in url]
    assert "narrative-absent/never:1" in str(info.value)
    assert provider.list_resources() == []
    until = int(time.time()) + 1
    pulls = docker_api.events(
        since=since, until=until, decode=True, filters={"type": "image", "event": "pull"}
    )
    assert list(pulls) == []
    mine = docker_api.events(
        since=since,
        until=until,
        decode=True,
        filters={"label": f"narrative.owner={provider.context.owner}"},
    )
    assert list(mine) == []
    with pytest.raises(Exception, match="No such image"):
        docker_api.inspect_image("narrative-absent/never:1")


def test_stop_start_keeps_state(make_docker_provider: MakeProvider) -> None:
    provider, cid = running(make_docker_provider)
    provider.write_file(cid, "kept.txt", b"still here\n")
    provider.stop(cid)
    assert provider.health(cid) is Health.UNREACHABLE
    with pytest.raises(ExecFailed, match="not running"):
        provider.exec(cid, ["true"])
    # The archive endpoints work on a stopped container.
    assert provider.read_file(cid, "kept.txt") == b"still here\n"
    provider.start(cid)
    assert provider.health(cid) is Health.OK
    assert sh(provider, cid, "cat kept.txt").stdout == b"still here\n"


def test_reconnect_refuses_another_environments_container(
    make_docker_provider: MakeProvider,
) -> None:
    provider, cid = running(make_docker_provider)
    stranger = make_docker_provider(owner=provider.context.owner)  # same store, other env
    with pytest.raises(ResourceGone):
        stranger.reconnect(cid)


def test_health_gone_and_idempotent_delete(
    make_docker_provider: MakeProvider, docker_api: Any
) -> None:
    provider, cid = running(make_docker_provider)
    docker_api.remove_container(cid, force=True)  # behind the provider's back
    assert provider.health(cid) is Health.GONE
    with pytest.raises(ResourceGone):
        provider.exec(cid, ["true"])
    with pytest.raises(ResourceGone):
        provider.read_file(cid, "x")
    with pytest.raises(ResourceGone):
        provider.start(cid)
    provider.delete(cid)
    provider.delete(cid)
    assert provider.list_resources() == []


def test_unreachable_daemon(make_docker_provider: MakeProvider, tmp_path: Path) -> None:
    provider = make_docker_provider(base_url=f"unix://{tmp_path}/absent.sock")
    with pytest.raises(ProviderUnavailable):
        provider.create()
    assert provider.health("0" * 64) is Health.UNREACHABLE


def test_create_replaces_leftover_of_same_environment(make_docker_provider: MakeProvider) -> None:
    provider = make_docker_provider()
    first = provider.create()  # as if the record was never written (crash after create)
    second = provider.create()
    assert second != first
    assert provider.list_resources() == [second]


# -- isolation and limits -----------------------------------------------------------------------


def test_no_network_by_default(make_docker_provider: MakeProvider, docker_api: Any) -> None:
    provider, cid = running(make_docker_provider)
    assert docker_api.inspect_container(cid)["HostConfig"]["NetworkMode"] == "none"
    lines = sh(provider, cid, "cat /proc/net/dev").stdout.decode().splitlines()[2:]
    assert [line.split(":")[0].strip() for line in lines] == ["lo"]
    assert "network" not in type(provider).capabilities_for(provider.config)


def test_resource_limits_and_read_only_mounts(
    make_docker_provider: MakeProvider, docker_api: Any
) -> None:
    provider, cid = running(make_docker_provider, mem_limit="256m", cpus=0.5, pids_limit=64)
    host = docker_api.inspect_container(cid)["HostConfig"]
    assert host["Memory"] == 256 * 1024 * 1024
    assert host["NanoCpus"] == 500_000_000
    assert host["PidsLimit"] == 64
    assert host["Init"] is True
    # The kernel enforces them: the container's own cgroup files say so.
    limits = sh(
        provider,
        cid,
        "cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max",
    ).stdout
    assert limits.strip() == b"64"
    denied = sh(provider, cid, "touch /usr/narrative-probe")
    assert denied.exit_code != 0
    assert b"Read-only file system" in denied.stderr


def test_capabilities_follow_config() -> None:
    from providers.docker.config import DockerConfig
    from providers.docker.provider import DockerProvider
    from providers.registry import get_provider_class

    assert get_provider_class("docker") is DockerProvider
    caps = DockerProvider.capabilities_for(
        DockerConfig(image="x", network=True, capabilities=["python"])
    )
    assert {"docker", "isolation", "exec", "files", "python", "network"} <= caps


# -- exec ---------------------------------------------------------------------------------------


def test_exec_streams_output_as_it_arrives(make_docker_provider: MakeProvider) -> None:
    provider, cid = running(make_docker_provider)
    seen: list[tuple[str, bytes]] = []

    def on_output(stream: str, chunk: bytes) -> None:
        seen.append((stream, chunk))
        if b"ready" in chunk:
            # The command waits for this file: it only appears if output is streamed.
            provider.write_file(cid, "go", b"")

    result = sh(
        provider,
        cid,
        "echo ready; while [ ! -e go ]; do sleep 0.05; done; "
        "echo err1 >&2; sleep 0.2; echo out2; sleep 0.2; echo err2 >&2",
        timeout=20,
        on_output=on_output,
    )
    assert not result.timed_out
    assert result.exit_code == 0
    assert result.stdout == b"ready\nout2\n"
    assert result.stderr == b"err1\nerr2\n"
    assert [(s, c.strip()) for s, c in seen] == [
        ("stdout", b"ready"),
        ("stderr", b"err1"),
        ("stdout", b"out2"),
        ("stderr", b"err2"),
    ]


def test_exec_exit_code_env_and_workdir(make_docker_provider: MakeProvider) -> None:
    provider, cid = running(make_docker_provider, env={"FROM_CONFIG": "c"})
    result = sh(provider, cid, 'echo "$PWD $GREETING $FROM_CONFIG"; exit 7', env={"GREETING": "hi"})
    assert result.exit_code == 7
    assert result.stdout == b"/work hi c\n"
    assert provider.exec(cid, ["true"]).exit_code == 0
    with pytest.raises(ExecFailed):
        provider.exec(cid, ["/no/such/binary"])
    with pytest.raises(InvalidInput):
        provider.exec(cid, [])


def test_exec_callback_error_stops_the_command(make_docker_provider: MakeProvider) -> None:
    provider, cid = running(make_docker_provider)

    def explode(stream: str, chunk: bytes) -> None:
        raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError, match="consumer failed"):
        sh(provider, cid, "echo x; sleep 43", on_output=explode, timeout=30)
    left = sh(provider, cid, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
    assert b"sleep 43" not in left


# -- files --------------------------------------------------------------------------------------


def test_files_round_trip(make_docker_provider: MakeProvider) -> None:
    provider, cid = running(make_docker_provider)
    binary = bytes(range(256)) * 3
    large = os.urandom(24 * 1024 * 1024 + 17)
    provider.write_file(cid, "notes.txt", b"hello\n")
    provider.write_file(cid, "deep/er/blob.bin", binary)
    provider.write_file(cid, "large.bin", large)
    assert provider.read_file(cid, "notes.txt") == b"hello\n"
    assert provider.read_file(cid, "deep/er/blob.bin") == binary
    assert provider.read_file(cid, "./deep//er/blob.bin") == binary
    assert provider.read_file(cid, "large.bin") == large
    assert sh(provider, cid, "wc -c < large.bin").stdout.strip() == str(len(large)).encode()
    provider.write_file(cid, "notes.txt", b"replaced")
    assert provider.read_file(cid, "notes.txt") == b"replaced"
    provider.delete_file(cid, "notes.txt")
    with pytest.raises(FileNotFoundError):
        provider.read_file(cid, "notes.txt")
    with pytest.raises(FileNotFoundError):
        provider.delete_file(cid, "notes.txt")
    with pytest.raises(IsADirectoryError):
        provider.read_file(cid, "deep")
    with pytest.raises(IsADirectoryError):
        provider.write_file(cid, "deep", b"would wipe the directory")
    with pytest.raises(IsADirectoryError):
        provider.delete_file(cid, "deep")
    assert provider.read_file(cid, "deep/er/blob.bin") == binary


# -- snapshots ----------------------------------------------------------------------------------


def collected(make: MakeProvider, store: Store, script: str) -> dict[str, tuple[int, bytes]]:
    """The top of the tree collected from a fresh container where ``script`` ran."""
    snap = take_snapshot(store, message="base").snapshot
    provider, cid = running(make)
    provider.restore(cid, snap)
    sh(provider, cid, script)
    result = provider.collect(cid, new_thread(store, "collected"), None, "collected")
    return entries(store, bytes.fromhex(result.tree))


def test_links_out_of_the_workspace_are_collected_as_data(
    make_docker_provider: MakeProvider, store: Store, tmp_path: Path
) -> None:
    script = "ln -s /etc/passwd escape && mkdir d && ln -s ../../../etc d/up"
    tree = collected(make_docker_provider, store, script)
    assert tree["escape"] == (0o120000, b"/etc/passwd")
    assert entries(store, tree["d"][1])["up"] == (0o120000, b"../../../etc")


def test_hard_links_come_home_as_files(make_docker_provider: MakeProvider, store: Store) -> None:
    """A hard link the agent made is collected as a second file of the same content (the engine
    names its target ``work/...`` as it names members; that prefix was not stripped there, and
    the whole collect failed: the run's work did not come home)."""
    script = "mkdir d && echo x > a && ln a b && ln a d/c && chmod +x a"
    tree = collected(make_docker_provider, store, script)
    assert tree["a"] == tree["b"] == (0o100755, b"x\n")
    assert entries(store, tree["d"][1])["c"] == tree["a"]
    git("fsck", "--strict", cwd=store.git_dir)


@pytest.mark.parametrize(
    "script",
    [
        "mkdir -p d/e && echo x > d/e/f && chmod +x d/e/f && echo '*.log' > d/.gitignore"
        " && echo y > d/a.log && mkdir empty && ln -s /etc/passwd out",
        "echo x > a && ln a b",  # the engine sends a hard link for the second name
        "mkdir -p r/.git/info && echo '*.o' > r/.git/info/exclude && echo 1 > r/m.o"
        " && echo 2 > r/m.c",
        "echo x > a && mkfifo p",
    ],
    ids=["plain", "hard-link", "nested-repo", "fifo"],
)
def test_collect_from_the_stream_equals_extract_then_snapshot(
    make_docker_provider: MakeProvider, store: Store, script: str
) -> None:
    """What the engine really sends: the streamed snapshot and the extracted one agree (the
    same tree, or both refuse)."""
    from providers.docker.files import open_archive
    from providers.shipping import scratch_dir, snapshot_from_tar

    snap = take_snapshot(store, message="base").snapshot
    provider, cid = running(make_docker_provider)
    provider.restore(cid, snap)
    sh(provider, cid, script)
    outcomes = []
    for extract in (False, True):
        thread = new_thread(store, f"t{extract}")
        with open_archive(provider.api, cid, "/work", 60) as stream:
            try:
                outcomes.append(
                    snapshot_from_tar(
                        store,
                        stream,
                        scratch_dir(store, "e"),
                        thread,
                        None,
                        "m",
                        "work/",
                        extract=extract,
                    ).tree
                )
            except InvalidInput as exc:
                outcomes.append(type(exc).__name__)
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("script", ["head -c 3000000 /dev/zero > big"], ids=["over-size-limit"])
def test_hostile_collect_is_refused(
    make_docker_provider: MakeProvider, store: Store, script: str
) -> None:
    snap = take_snapshot(store, message="base").snapshot
    provider, cid = running(make_docker_provider, max_collect_bytes=1024 * 1024)
    provider.restore(cid, snap)
    sh(provider, cid, script)
    thread = new_thread(store, "hostile")
    before = store_state(store)
    with pytest.raises(InvalidInput):
        provider.collect(cid, thread, None, "hostile")
    assert store_state(store) == before
    scratch = Path(store.git_dir) / "narrative" / "envs" / provider.context.env_id / "collect"
    assert not scratch.exists()


@pytest.mark.parametrize(
    "fields",
    [
        {"mem_limit": "lots"},
        {"mem_limit": 0},
        {"cpus": 0},
        {"workdir": "relative"},
        {"workdir": "/"},
        {"mounts": [{"source": "usr", "target": "/usr"}]},
        {"mounts": [{"source": "/a:b", "target": "/usr"}]},
        {"image": " "},
        {"unknown": 1},
    ],
)
def test_bad_config_is_refused(fields: dict[str, Any]) -> None:
    from pydantic import ValidationError

    from providers.docker.config import DockerConfig

    with pytest.raises(ValidationError):
        DockerConfig.model_validate({"image": "x", **fields})


def test_missing_sdk_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from providers import registry
    from providers.errors import MissingDependency

    # As if the optional SDK were not installed: importing it raises ImportError(name="docker").
    monkeypatch.setitem(sys.modules, "docker", None)
    for module in [m for m in sys.modules if m.startswith("providers.docker.")]:
        monkeypatch.delitem(sys.modules, module)  # each would be re-imported without the SDK
    monkeypatch.delitem(registry._LOADED, "docker", raising=False)
    with pytest.raises(MissingDependency, match=r"narrative-engine\[docker\]"):
        registry.get_provider_class("docker")
