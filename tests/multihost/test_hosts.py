"""The multi-host harness itself: hosts reach each other and nothing else, see only their own
files and processes, speak stock SSH to each other, and suffer the faults the harness injects;
nothing is left behind afterwards."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.multihost.hosts import (
    CHECKOUT,
    PREFIX,
    REQUIRE_ENV,
    SSHD,
    HarnessError,
    Host,
    HostCommandError,
    Network,
    SshKey,
    make_ssh_key,
    sweep_stale,
)

pytestmark = pytest.mark.hosts

# accepts connections on ADDRESS PORT and answers each with the host's name
SERVER = textwrap.dedent(
    """
    import socket, sys
    srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
    name = socket.gethostname().encode()
    while True:
        conn, _ = srv.accept()
        conn.sendall(name)
        conn.close()
    """
)

# connects to ADDRESS PORT within TIMEOUT; prints {"ok": ..., "answer"|"error": ..., "seconds": ...}
PROBE = textwrap.dedent(
    """
    import json, socket, sys, time
    start = time.monotonic()
    try:
        timeout = float(sys.argv[3])
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=timeout) as s:
            s.settimeout(timeout)
            result = {"ok": True, "answer": s.recv(100).decode()}
    except OSError as exc:
        result = {"ok": False, "error": type(exc).__name__ + ": " + str(exc)}
    result["seconds"] = time.monotonic() - start
    print(json.dumps(result))
    """
)


# receives one connection on ADDRESS:9000 and prints its length and sha256
SINK = textwrap.dedent(
    """
    import hashlib, socket, sys
    server = socket.create_server((sys.argv[1], 9000))
    print("listening", flush=True)
    conn, _ = server.accept()
    digest, size = hashlib.sha256(), 0
    while data := conn.recv(1 << 16):
        digest.update(data)
        size += len(data)
    print(size, digest.hexdigest(), flush=True)
    """
)

# sends SIZE random bytes to ADDRESS:9000 and prints their length and sha256
SOURCE = textwrap.dedent(
    """
    import hashlib, os, socket, sys
    data = os.urandom(int(sys.argv[2]))
    with socket.create_connection((sys.argv[1], 9000)) as conn:
        conn.sendall(data)
    print(len(data), hashlib.sha256(data).hexdigest())
    """
)


def probe(src: Host, address: str, port: int, timeout: float = 2) -> dict[str, object]:
    out = src.run(["python3", "-c", PROBE, address, str(port), str(timeout)], timeout=timeout + 10)
    result: dict[str, object] = json.loads(out.stdout)
    return result


def serve(host: Host, port: int = 8000) -> subprocess.Popen[bytes]:
    """A name-answering TCP server on the host, ready when this returns."""
    proc = host.popen(["python3", "-c", SERVER, host.address, str(port)])
    deadline = time.monotonic() + 10
    while not probe(host, host.address, port, 1)["ok"]:
        assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    return proc


def machine_addresses() -> list[str]:
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines()]


def test_hosts_reach_each_other_and_nothing_else(network: Network) -> None:
    a = network.add_host("alpha")
    b = network.add_host("beta")
    assert a.address != b.address and a.address.startswith(f"10.231.{network.subnet}.")
    serve(b)
    assert probe(a, b.address, 8000) == {
        "ok": True,
        "answer": "beta",
        "seconds": pytest.approx(0, abs=1),
    }

    routes = [line.split() for line in a.run(["ip", "route"]).stdout.decode().splitlines()]
    assert routes == [
        f"10.231.{network.subnet}.0/24 dev eth0 proto kernel scope link src {a.address}".split()
    ]
    # anything off the /24 fails at once: there is no route to it
    for outside in ["10.0.0.1", "1.1.1.1", *machine_addresses()]:
        result = probe(a, outside, 9)
        assert not result["ok"] and "unreachable" in str(result["error"]), result
        assert float(str(result["seconds"])) < 0.5
    # and the machine itself is not on the network (no address of it is in the /24; trying to
    # connect from here would send the packet out through the machine's default route)
    assert not [a for a in machine_addresses() if a.startswith(f"10.231.{network.subnet}.")]


def test_files_and_users_are_private(network: Network) -> None:
    a = network.add_host("alpha")
    b = network.add_host("beta")
    dev = network.add_host("dev", sees_checkout=True)
    marker = f"/tmp/marker-{os.getpid()}-{time.monotonic_ns()}"
    a.sh(f"echo from-alpha > {marker}")
    assert a.read_file(marker) == b"from-alpha\n"
    assert b.run(["test", "-e", marker], check=False).returncode == 1
    assert not Path(marker).exists()

    for host in (a, b, dev):
        who = host.sh('id -un; id -u; stat -c "%U %a" "$HOME"; echo "$HOME"; hostname')
        assert who.stdout.decode().split("\n")[:5] == [
            host.user,
            str(host.uid),
            f"{host.user} 755",
            host.home,
            host.name,
        ]
        # root's home is empty: only the interpreter the checkout's venv needs, for dev
        assert host.run(["ls", "-A", "/root"], as_user=False).stdout == (
            b".pyenv\n" if host is dev and sys.base_prefix.startswith("/root/.pyenv/") else b""
        )
        # the machine's users and their homes are not there
        assert host.run(["ls", "/home"]).stdout.decode().split() == [host.user]
    assert len({a.uid, b.uid, dev.uid}) == 3
    assert b.run(["id", a.user], check=False).returncode == 1  # alpha's user is not on beta

    # the checkout: hidden unless asked for, and then runnable
    assert a.run(["ls", "-A", "/work"]).stdout == b""
    # (where the checkout is not under /work, its own directory is an empty tmpfs)
    listing = a.run(["sh", "-c", f"ls -A {shlex.quote(CHECKOUT)} 2>/dev/null"], check=False)
    assert listing.stdout == b""
    assert a.run(["test", "-e", f"{CHECKOUT}/narrative"], check=False).returncode == 1
    code = "import narrative, sys; print(narrative.__file__)"
    out = dev.run([dev.python(), "-c", code], env=dev.checkout_env()).stdout.decode().strip()
    assert out == f"{CHECKOUT}/narrative/__init__.py"
    assert b"Usage" in dev.run([dev.narrative(), "--help"], env=dev.checkout_env()).stdout
    # read-only rebinds still keep the user out of other people's files
    with pytest.raises(HostCommandError):
        dev.run(["touch", f"{CHECKOUT}/should-not-exist"])
    with pytest.raises(HostCommandError):
        a.run(["cat", "/etc/shadow"])


def test_processes_are_private(network: Network) -> None:
    a = network.add_host("alpha")
    b = network.add_host("beta")
    sleeper = a.popen(["sleep", "1234"])
    wait_for_process(a, "sleep 1234")
    seen_on_b = b.run(["ps", "-eo", "pid,args"]).stdout.decode()
    assert "sleep 1234" not in seen_on_b
    assert "1 " in seen_on_b  # b's own init
    listing = (
        "import os; print([open(f'/proc/{p}/cmdline', 'rb').read()"
        " for p in os.listdir('/proc') if p.isdigit()])"
    )
    assert b"sleep" not in b.run(["python3", "-c", listing]).stdout
    # signalling what popen returned signals the command inside, and its status comes back
    sleeper.terminate()
    assert sleeper.wait(5) == -signal.SIGTERM
    # the command also dies when the nsenter in front of it does (e.g. the test process died)
    other = a.popen(["sleep", "1235"])
    wait_for_process(a, "sleep 1235")
    os.kill(other.pid, signal.SIGKILL)
    assert other.wait(5) == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while b"sleep 123" in a.run(["ps", "-eo", "args"]).stdout:
        assert time.monotonic() < deadline, "the command outlived its popen"
        time.sleep(0.05)


def wait_for_process(host: Host, args: str) -> None:
    deadline = time.monotonic() + 5
    while args.encode() not in host.run(["ps", "-eo", "args"]).stdout:
        assert time.monotonic() < deadline, f"{args} did not start on {host.name}"
        time.sleep(0.05)


def client_files(host: Host, key: SshKey, known_hosts_line: str) -> tuple[str, str]:
    """Install ``key`` and a known_hosts file in host's ~/.ssh; returns their inside paths."""
    identity = f"{host.home}/.ssh/id_ed25519"
    known = f"{host.home}/.ssh/known_hosts_test"
    host.write_file(identity, key.private_bytes, mode=0o600)
    host.write_file(known, known_hosts_line + "\n", mode=0o600)
    return identity, known


def ssh(
    src: Host, dst: Host, identity: str, known: str, *command: str, options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[bytes]:
    """Stock OpenSSH from ``src`` to ``dst``'s user, strict about the host key."""
    strict = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5"]
    return src.run(
        ["ssh", "-i", identity, *strict, "-o", f"UserKnownHostsFile={known}", *options,
         f"{dst.user}@{dst.address}", *command],
        check=False,
        timeout=30,
    )  # fmt: skip


def test_ssh_between_hosts(network: Network, ssh_key: SshKey, tmp_path: Path) -> None:
    a = network.add_host("alpha")
    b = network.add_host("beta", sshd=True)
    b.authorize(ssh_key.public_line)
    identity, known = client_files(a, ssh_key, b.host_key_line())
    done = ssh(a, b, identity, known, "hostname; id -un; echo $HOME")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == ["beta", b.user, b.home]

    # the fingerprint the harness reports is the one ssh-keygen computes from the known_hosts line
    listed = a.run(["ssh-keygen", "-lf", known]).stdout.decode().split()
    assert listed[1] == b.host_key_fingerprint() and listed[1].startswith("SHA256:")
    assert b.host_key_line().startswith(f"{b.address} ssh-ed25519 ")

    # the server's settings, as sshd itself reports them
    settings = b.run([SSHD, "-T", "-f", "/run/host/sshd_config"], as_user=False).stdout.decode()
    for expected in [
        "pubkeyauthentication yes",
        "passwordauthentication no",
        "kbdinteractiveauthentication no",
        "allowagentforwarding no",
        "allowtcpforwarding remote",
        "allowstreamlocalforwarding yes",
        "streamlocalbindunlink yes",
        f"listenaddress {b.address}:22",
    ]:
        assert expected in settings.splitlines(), expected

    # a reverse tunnel (what a provider opens when the remote cannot reach the hub) carries
    # connections on beta back to a server on alpha
    serve(a)
    forward = ("-o", "ExitOnForwardFailure=yes", "-R", f"127.0.0.1:7001:{a.address}:8000")
    tunnel = ssh(a, b, identity, known, "python3", "-c", shlex.quote(PROBE), "127.0.0.1", "7001",
                 "5", options=forward)  # fmt: skip
    assert tunnel.returncode == 0, tunnel.stderr
    assert json.loads(tunnel.stdout)["answer"] == "alpha"

    # a known_hosts line for another key is refused
    impostor = make_ssh_key(tmp_path / "impostor").public_line.split()
    a.write_file(known, f"{b.address} {impostor[0]} {impostor[1]}\n", mode=0o600)
    refused = ssh(a, b, identity, known, "true")
    assert refused.returncode == 255 and b"Host key verification failed" in refused.stderr

    # an unauthorized key is refused too
    _, known = client_files(a, ssh_key, b.host_key_line())
    stranger = make_ssh_key(tmp_path / "stranger")
    a.write_file(f"{a.home}/.ssh/stranger", stranger.private_bytes, mode=0o600)
    denied = ssh(a, b, f"{a.home}/.ssh/stranger", known, "true")
    assert denied.returncode == 255 and b"Permission denied" in denied.stderr

    # a restarted sshd has the same key and takes connections again
    b.restart_sshd()
    assert b.sshd_log().count("Server listening on") == 2
    done = ssh(a, b, identity, known, "hostname")
    assert done.returncode == 0 and done.stdout == b"beta\n", done.stderr


def test_link_down_and_up(network: Network) -> None:
    a = network.add_host("alpha")
    b = network.add_host("beta")
    serve(b)
    b.link_down()
    result = probe(a, b.address, 8000, timeout=1)
    assert not result["ok"] and "timed out" in str(result["error"]), result
    b.link_up()
    deadline = time.monotonic() + 10
    while not (result := probe(a, b.address, 8000, timeout=1))["ok"]:
        assert time.monotonic() < deadline, result
    assert result["answer"] == "beta"


def test_netem_adds_latency(network: Network) -> None:
    a = network.add_host("alpha")
    b = network.add_host("beta")
    serve(b)
    base = float(str(probe(a, b.address, 8000)["seconds"]))
    b.netem(delay_ms=100)
    slow = probe(a, b.address, 8000)
    # connect + answer: two round trips, each 2 x 100 ms slower
    assert slow["ok"] and float(str(slow["seconds"])) >= base + 0.35, (base, slow)
    b.clear_netem()
    fast = probe(a, b.address, 8000)
    assert fast["ok"] and float(str(fast["seconds"])) < 0.15, fast
    b.netem(loss_pct=100)
    lost = probe(a, b.address, 8000, timeout=1)
    assert not lost["ok"], lost
    # bulk data crosses the emulated link intact (segments bigger than the MTU included)
    b.netem(delay_ms=5, loss_pct=1)
    sink = b.popen(["python3", "-c", SINK, b.address], stdout=subprocess.PIPE)
    assert sink.stdout is not None and sink.stdout.readline() == b"listening\n"
    sent = a.run(["python3", "-c", SOURCE, b.address, str(4 << 20)]).stdout.split()
    assert sink.stdout.readline().split() == sent and sent[0] == str(4 << 20).encode()
    assert sink.wait(10) == 0
    b.clear_netem()


def test_reboot_kills_processes_and_clears_tmp(network: Network, ssh_key: SshKey) -> None:
    a = network.add_host("alpha")
    b = network.add_host("beta", sshd=True)
    b.authorize(ssh_key.public_line)
    identity, known = client_files(a, ssh_key, b.host_key_line())
    # a daemon that left its parent (reparented to the host's init) dies too
    b.sh("setsid sleep 4321 </dev/null >/dev/null 2>&1 & echo started > /tmp/state")
    sleeper = b.popen(["sleep", "1234"])
    b.sh("echo kept > ~/notes")
    before = set(b.pids())
    assert before

    b.reboot()
    assert sleeper.wait(5) == -signal.SIGKILL
    assert not before & set(b.pids())
    assert b.run(["ls", "-A", "/tmp"]).stdout == b""
    assert b"sleep" not in b.run(["ps", "-eo", "args"]).stdout
    assert b.sh("cat ~/notes").stdout == b"kept\n"
    assert (
        b.run(["ip", "-4", "-o", "addr", "show", "eth0"]).stdout.split()[3]
        == f"{b.address}/24".encode()
    )
    done = ssh(a, b, identity, known, "hostname")
    assert done.returncode == 0 and done.stdout == b"beta\n", done.stderr


def test_enter_net_puts_a_thread_on_the_network(network: Network) -> None:
    a = network.add_host("alpha")
    b = network.add_host("beta")
    serve(b)
    own = os.readlink("/proc/thread-self/ns/net")
    with a.enter_net():
        assert os.readlink("/proc/thread-self/ns/net") != own
        with socket.create_connection((b.address, 8000), timeout=2) as conn:
            assert conn.recv(100) == b"beta"
    # (connecting from here now would leave through the machine's route: not tried)
    assert os.readlink("/proc/thread-self/ns/net") == own


def leftovers(network_id: str, state_dir: str, pids: list[int]) -> list[str]:
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    found += [line for line in netns.stdout.splitlines() if line.startswith(network_id)]
    if Path(state_dir).exists():
        found.append(state_dir)
    found += [f"pid {pid} {_describe(pid)}" for pid in pids if Path(f"/proc/{pid}").exists()]
    # the veth pairs were made inside the namespaces, so none can outlive them on the machine
    return found


def test_close_leaves_nothing_even_after_a_failure() -> None:
    from tests.multihost.conftest import require_namespaces

    require_namespaces()
    seen: dict[str, object] = {}
    with pytest.raises(ZeroDivisionError), Network("teardown") as net:
        a = net.add_host("alpha", sshd=True)
        net.add_host("beta")
        a.popen(["sleep", "999"])
        a.sh("setsid sleep 998 </dev/null >/dev/null 2>&1 &")
        seen.update(id=net.id, state=net.state_dir, pids=[p for h in net.hosts for p in h.pids()])
        _ = 1 / 0
    assert len(seen["pids"]) >= 4  # type: ignore[arg-type]
    assert leftovers(str(seen["id"]), str(seen["state"]), seen["pids"]) == []  # type: ignore[arg-type]


STALE = """
import os, sys
sys.path.insert(0, sys.argv[1])
from tests.multihost.hosts import Network
net = Network("stale")
net.add_host("alpha").popen(["sleep", "999"])
print(net.id, net.state_dir, flush=True)
os.kill(os.getpid(), 9)
"""


def test_a_killed_run_is_swept() -> None:
    from tests.multihost.conftest import require_namespaces

    require_namespaces()
    # the hosts' processes keep a copy of stdout open: read the line, not to the end
    with subprocess.Popen(
        [sys.executable, "-c", STALE, CHECKOUT], stdout=subprocess.PIPE, text=True
    ) as killed:
        assert killed.stdout is not None
        network_id, state_dir = killed.stdout.readline().split()
        assert killed.wait(30) == -signal.SIGKILL
    assert network_id.startswith(f"{PREFIX}-")
    assert leftovers(network_id, state_dir, []) != []
    removed = sweep_stale()
    assert f"{network_id}-sw" in removed and state_dir in removed
    assert leftovers(network_id, state_dir, []) == []


def _describe(pid: int) -> str:
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()[:7]
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() + str(status)
    except OSError:
        return "gone"


def test_missing_namespaces_skip_or_fail_as_required(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.multihost import conftest, hosts

    monkeypatch.setattr(hosts, "_probe_result", ["network namespaces need root"])
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="need root"):
        conftest.require_namespaces()
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="need root"):
        conftest.require_namespaces()
    with pytest.raises(HarnessError, match="need root"):
        Network("unavailable")
