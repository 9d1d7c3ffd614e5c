"""A multi-host test network built from Linux namespaces on one machine (DESIGN.md §5).

A ``Network`` is a "switch" network namespace holding a bridge; each ``Host`` is a network
namespace wired to that bridge by a veth pair (its own address in a private /24, no default
route, no NAT, so nothing leaves the network), plus its own mount, PID, UTS and IPC namespaces
and its own unprivileged user. Inside a host, ``/tmp``, ``/run``, ``/var/tmp``, ``/var/log``,
``/dev/shm``, ``/root`` and ``/home`` are private (tmpfs, or the host's own home directory),
``/etc/passwd``, ``/etc/group`` and ``/etc/shadow`` are the host's own copies, and the checkout
(``/work`` here) is hidden unless the host is made with ``sees_checkout=True``.

Each host runs a small init (PID 1 of its PID namespace, which reaps orphans); commands enter
it with ``nsenter`` and become the host's user with ``setpriv``. Killing that init kills every
process of the host, which is how ``reboot`` works. Every name the harness creates carries the
creating process's pid and start time, so a later run can sweep what a killed run left behind
without touching a run still going in parallel.

Needs root, ``ip`` (iproute2), util-linux (``unshare``, ``nsenter``, ``setpriv``) and
Debian's ``openssh-server``/``openssh-client``; ``unavailable_reason()`` says what is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import random
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

PREFIX = "nmh"
REQUIRE_ENV = "NARRATIVE_REQUIRE_NETNS"
SSHD = "/usr/sbin/sshd"
# the repository this harness belongs to and the interpreter running the tests (its venv):
# a host made with sees_checkout=True can run the checkout's code through them
CHECKOUT = str(Path(__file__).resolve().parents[2])
CHECKOUT_PYTHON = sys.executable
FIRST_UID = 2000
USER_PATH = "/usr/local/bin:/usr/bin:/bin"
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_TOOLS = ("ip", "unshare", "nsenter", "setpriv", "mount", "ssh", "ssh-keygen")
_CLONE_NEWNET = 0x40000000


class HostCommandError(subprocess.CalledProcessError):
    """A command inside a host exited non-zero; the message carries its output."""

    def __init__(self, host: str, proc: subprocess.CompletedProcess[bytes]) -> None:
        super().__init__(proc.returncode, proc.args, proc.stdout, proc.stderr)
        self.host = host

    def __str__(self) -> str:
        err = (self.stderr or b"").decode(errors="replace")[-2000:]
        out = (self.stdout or b"").decode(errors="replace")[-500:]
        return f"on host {self.host}: {super().__str__()}\nstderr: {err}\nstdout: {out}"


class HarnessError(RuntimeError):
    """The harness could not build or control a host (the message says which step)."""


# ---------------------------------------------------------------------------------------------
# availability


_probe_result: list[str | None] = []


def unavailable_reason() -> str | None:
    """Why namespaces cannot be built here, or None when they can (probed once per process)."""
    if _probe_result:
        return _probe_result[0]
    reason = _probe()
    _probe_result.append(reason)
    return reason


def _probe() -> str | None:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in _TOOLS if shutil.which(tool, path=ROOT_PATH) is None]
    if not os.access(SSHD, os.X_OK):
        missing.append(f"{SSHD} (Debian's openssh-server)")
    if missing:
        return "missing: " + ", ".join(missing)
    name = f"{PREFIX}-0-{_owner_tag()}-probe"  # subnet 0 is never handed out; swept if left
    try:
        _cmd("ip", "netns", "add", name)
        _cmd("ip", "netns", "exec", name, "unshare", "--mount", "--pid", "--fork", "true")
    except HarnessError as exc:
        return f"cannot create namespaces: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return None


# ---------------------------------------------------------------------------------------------
# small helpers


def _cmd(*argv: str, input: bytes | None = None, timeout: float = 30) -> str:
    """Run a machine-side command, raising HarnessError with its stderr when it fails."""
    proc = subprocess.run(
        argv, input=input, capture_output=True, timeout=timeout, check=False, env=_root_env()
    )
    if proc.returncode != 0:
        raise HarnessError(f"{shlex.join(argv)}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode()


def _root_env() -> dict[str, str]:
    return {"PATH": ROOT_PATH, "LANG": "C.UTF-8"}


def _start_time(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_tag() -> str:
    """``PID-STARTTIME`` of this process: names carrying it are ours while we live."""
    return f"{os.getpid()}-{_start_time(os.getpid())}"


_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-(\d+)-(\d+)-")


def _owner_alive(name: str) -> bool:
    """Whether the process that created a harness object named ``name`` still runs."""
    match = _NAME_RE.match(name)
    if match is None:
        return True  # not one of ours (or a probe): never touch it
    return _start_time(int(match.group(2))) == match.group(3)


def _netns_names() -> list[str]:
    return [line.split()[0] for line in _cmd("ip", "netns", "list").splitlines() if line.strip()]


def _netns_pids(netns: str) -> list[int]:
    try:
        out = _cmd("ip", "netns", "pids", netns)
    except HarnessError:
        return []
    return [int(pid) for pid in out.split()]


def _kill_netns_processes(netns: str, timeout: float = 10) -> None:
    """SIGKILL every process in ``netns`` and wait until none is left."""
    deadline = time.monotonic() + timeout
    while pids := _netns_pids(netns):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise HarnessError(f"processes {pids} of {netns} survive SIGKILL")
        time.sleep(0.05)


def _delete_netns(netns: str) -> None:
    _kill_netns_processes(netns)
    subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


def sweep_stale() -> list[str]:
    """Remove namespaces and state directories left by harness runs whose process is gone
    (a run killed before its teardown); returns what was removed."""
    removed = []
    for netns in _netns_names():
        if netns.startswith(f"{PREFIX}-") and not _owner_alive(netns):
            _delete_netns(netns)
            removed.append(netns)
    for state in Path(tempfile.gettempdir()).glob(f"{PREFIX}-*"):
        if state.is_dir() and not _owner_alive(state.name):
            shutil.rmtree(state, ignore_errors=True)
            removed.append(str(state))
    return removed


@contextlib.contextmanager
def _subnet_lock() -> Iterator[None]:
    with open(Path(tempfile.gettempdir()) / f"{PREFIX}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _free_subnet() -> int:
    """A third octet no live network uses (call under _subnet_lock)."""
    used = set()
    for netns in _netns_names():
        if match := re.match(rf"^{PREFIX}-(\d+)-", netns):
            used.add(int(match.group(1)))
    candidates = [n for n in range(1, 255) if n not in used]
    if not candidates:
        raise HarnessError("all 254 test subnets are in use")
    return random.choice(candidates)


def _sanitize(text: str, limit: int) -> str:
    return re.sub(r"[^a-z0-9]+", "", text.lower())[:limit] or "x"


def _read_line(stream: IO[bytes], timeout: float) -> bytes:
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else b""


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class HostProcess(subprocess.Popen[bytes]):
    """A process started inside a host: ``pid`` is the machine-side ``nsenter`` in front of
    it; signals (``terminate``, ``kill``, ``send_signal``) go to the command itself, so
    nsenter reaps it and exits with its status (killing nsenter first would leave the command
    a zombie of the machine's init, which holds up the host's next reboot)."""

    def send_signal(self, sig: int) -> None:
        inner = _children(self.pid) if self.returncode is None else []
        if inner:
            with contextlib.suppress(ProcessLookupError):
                os.kill(inner[0], sig)
        else:
            super().send_signal(sig)


def _reap(proc: subprocess.Popen[bytes], grace: float = 0, close_pipes: bool = True) -> None:
    """Wait for ``proc`` (up to ``grace`` seconds, then kill it) and close its pipes."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    for stream in (proc.stdin, proc.stdout, proc.stderr) if close_pipes else ():
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


# ---------------------------------------------------------------------------------------------
# SSH keys


@dataclass(frozen=True)
class SshKey:
    """An ed25519 key pair on the machine: ``private_path`` (mode 0600) and its
    ``public_line`` ("ssh-ed25519 AAAA... comment") for authorized_keys."""

    private_path: Path
    public_line: str

    @property
    def private_bytes(self) -> bytes:
        return self.private_path.read_bytes()


def make_ssh_key(path: Path | str, comment: str = "narrative-test") -> SshKey:
    """Generate an ed25519 key pair at ``path`` (and ``path``.pub) with stock ssh-keygen."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _cmd("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))
    return SshKey(path, path.with_name(path.name + ".pub").read_text().strip())


# ---------------------------------------------------------------------------------------------
# the network


class Network:
    """A switch namespace with a bridge, and the hosts attached to it. Use as a context
    manager; ``close()`` kills every process of every host and deletes all namespaces and state
    directories (also when building failed half-way)."""

    def __init__(self, tag: str) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise HarnessError(reason)
        sweep_stale()
        self.tag = _sanitize(tag, 24)
        self.hosts: list[Host] = []
        self._namespaces: list[str] = []
        self._closed = False
        self.state_dir = ""
        try:
            with _subnet_lock():
                self.subnet = _free_subnet()
                self.id = f"{PREFIX}-{self.subnet}-{_owner_tag()}"
                self.switch_ns = self._add_netns("sw")
            self.state_dir = tempfile.mkdtemp(prefix=f"{self.id}-{self.tag}-")
            os.chmod(self.state_dir, 0o711)
            self._in_switch("ip", "link", "set", "lo", "up")
            self._in_switch("ip", "link", "add", "br0", "type", "bridge")
            self._in_switch("ip", "link", "set", "br0", "up")
            # bridged frames must not pass through a netfilter the switch namespace may inherit
            with contextlib.suppress(HarnessError):
                self._in_switch("sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=0")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Network:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Network {self.id} 10.231.{self.subnet}.0/24 hosts={[h.name for h in self.hosts]}>"

    def _add_netns(self, suffix: str) -> str:
        name = f"{self.id}-{suffix}"
        self._namespaces.append(name)
        _cmd("ip", "netns", "add", name)
        return name

    def _in_switch(self, *argv: str) -> str:
        return _cmd("ip", "netns", "exec", self.switch_ns, *argv)

    def add_host(
        self,
        name: str,
        *,
        sshd: bool = False,
        sees_checkout: bool = False,
        user: str | None = None,
    ) -> Host:
        """A new host called ``name`` (its hostname too), address 10.231.N.(index+2), with a
        user (default: the host's name) of uid 2000+index whose home survives reboots."""
        if self._closed:
            raise HarnessError("the network is closed")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,15}", name) or any(
            h.name == name for h in self.hosts
        ):
            raise HarnessError(f"host name {name!r}: want a new [a-z][a-z0-9]* of ≤16 chars")
        index = len(self.hosts)
        if index >= 200:
            raise HarnessError("at most 200 hosts per network")
        host = Host(self, name, index, sshd=sshd, sees_checkout=sees_checkout, user=user)
        self.hosts.append(host)
        host._build()
        for other in self.hosts[:-1]:  # every host knows the others by name (/etc/hosts)
            other.know(host.name, host.address)
            host.know(other.name, other.address)
        return host

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def close(self) -> None:
        """Tear everything down; safe to call twice and after a failed build."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for host in self.hosts:
            try:
                host._shutdown()
            except Exception as exc:  # keep tearing down the rest
                errors.append(f"{host.name}: {exc}")
        for netns in reversed(self._namespaces):
            try:
                _delete_netns(netns)
            except Exception as exc:
                errors.append(f"{netns}: {exc}")
        for host in self.hosts:
            host._close_popens_and_link()
        if self.state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        if errors:
            raise HarnessError("teardown: " + "; ".join(errors))


# ---------------------------------------------------------------------------------------------
# a host

# PID 1 of a host: reap every orphan at once, so a dead daemon never lingers as a zombie
_REAPER = """
import os, signal
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
while True:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    signal.sigwait({signal.SIGCHLD})
"""


# A host's link with delay and loss (the kernel here has no sch_netem): frames from the host's
# switch port are read with AF_PACKET, held back and dropped at random, and written to a spare
# veth whose peer sits on the bridge, and the same the other way. The virtio-net header
# (PACKET_VNET_HDR) carries GSO/checksum state through unchanged, so large segments survive.
_LINK_EMULATOR = """
import heapq, random, select, socket, sys, time
ETH_P_ALL, SOL_PACKET, PACKET_VNET_HDR, PACKET_OUTGOING = 3, 263, 15, 4
def port(dev):
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.bind((dev, ETH_P_ALL))
    sock.setblocking(False)
    return sock
host_side, bridge_side = port(sys.argv[1]), port(sys.argv[2])
delay, loss = float(sys.argv[3]) / 1000, float(sys.argv[4]) / 100
other = {host_side: bridge_side, bridge_side: host_side}
queue, seq = [], 0
print("ready", flush=True)
while True:
    wait = max(0.0, queue[0][0] - time.monotonic()) if queue else None
    for sock in select.select([host_side, bridge_side], [], [], wait)[0]:
        while True:
            try:
                frame, address = sock.recvfrom(1 << 17)
            except (BlockingIOError, OSError):
                break
            if address[2] == PACKET_OUTGOING or random.random() < loss:
                continue
            seq += 1
            heapq.heappush(queue, (time.monotonic() + delay, seq, other[sock], frame))
    now = time.monotonic()
    while queue and queue[0][0] <= now:
        _, _, sock, frame = heapq.heappop(queue)
        try:
            sock.send(frame)
        except OSError:
            pass  # a port that is down drops the frame, as a cable would
"""


def _system_python() -> str:
    """The machine's own python3 (hosts see /usr; a venv's base may be hidden from them)."""
    return shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "python3"


class Host:
    """One machine of a ``Network``: see the module docstring for what it has of its own."""

    def __init__(
        self,
        network: Network,
        name: str,
        index: int,
        *,
        sshd: bool,
        sees_checkout: bool,
        user: str | None,
    ) -> None:
        self.network = network
        self.name = name
        self.index = index
        self.address = f"10.231.{network.subnet}.{index + 2}"
        self.user = user or name
        self.uid = FIRST_UID + index
        self.gid = self.uid
        self.home = f"/home/{self.user}"
        self.sees_checkout = sees_checkout
        self.has_sshd = sshd
        self.sshd_port = 22
        self.netns = ""
        self.switch_port = f"h{index}"
        self.state_dir = Path(network.state_dir) / name
        self.system_dir = self.state_dir / "system"  # /run/host inside: keys, config, passwd
        self.home_dir = self.state_dir / "home"  # the home as the machine sees it
        self._init: subprocess.Popen[bytes] | None = None
        self._init_pid = 0
        self._sshd: HostProcess | None = None
        self._popens: list[subprocess.Popen[bytes]] = []
        self._link_emulator: subprocess.Popen[bytes] | None = None
        self._spare_link = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.address} user={self.user}>"

    # -- building --------------------------------------------------------------------------

    def _build(self) -> None:
        self.netns = self.network._add_netns(f"h-{self.name}")
        sw = self.network.switch_ns
        _cmd(
            "ip",
            "link",
            "add",
            "name",
            "eth0",
            "netns",
            self.netns,
            "type",
            "veth",
            "peer",
            "name",
            self.switch_port,
            "netns",
            sw,
        )
        _cmd("ip", "-n", sw, "link", "set", self.switch_port, "master", "br0", "up")
        _cmd("ip", "-n", self.netns, "link", "set", "lo", "up")
        _cmd("ip", "-n", self.netns, "addr", "add", f"{self.address}/24", "dev", "eth0")
        _cmd("ip", "-n", self.netns, "link", "set", "eth0", "up")
        self._write_system_files()
        self._start_init()
        if self.has_sshd:
            self._start_sshd()

    def _write_system_files(self) -> None:
        self.system_dir.mkdir(parents=True, mode=0o700)
        os.chmod(self.state_dir, 0o711)
        self.home_dir.mkdir(mode=0o755)
        os.chown(self.home_dir, self.uid, self.gid)
        real_users = {
            line.split(":", 1)[0] for line in Path("/etc/passwd").read_text().splitlines()
        }
        if self.user in real_users:
            raise HarnessError(f"user {self.user!r} exists on the machine: pick another name")
        entries = {
            "passwd": f"{self.user}:x:{self.uid}:{self.gid}::{self.home}:/bin/bash\n",
            "group": f"{self.user}:x:{self.gid}:\n",
            # "*": no password, yet not locked ("!" makes sshd refuse the key without PAM)
            "shadow": f"{self.user}:*:19000:0:99999:7:::\n",
            "hosts": "",  # the other hosts' names are added as they join (know)
        }
        for file, line in entries.items():
            real = Path("/etc") / file
            copy = self.system_dir / file
            text = real.read_text() if real.exists() else ""
            copy.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line)
            stat = real.stat() if real.exists() else None
            os.chmod(copy, stat.st_mode & 0o7777 if stat else 0o644)
            if stat:
                os.chown(copy, stat.st_uid, stat.st_gid)
        if self.has_sshd:
            key = self.system_dir / "ssh_host_ed25519_key"
            _cmd("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.name, "-f", str(key))
            (self.system_dir / "sshd_config").write_text(
                "\n".join(
                    [
                        f"ListenAddress {self.address}:{self.sshd_port}",
                        "HostKey /run/host/ssh_host_ed25519_key",
                        "PidFile none",
                        "PubkeyAuthentication yes",
                        "AuthenticationMethods publickey",
                        "PasswordAuthentication no",
                        "KbdInteractiveAuthentication no",
                        "UsePAM no",
                        "PermitRootLogin no",
                        f"AllowUsers {self.user}",
                        "AuthorizedKeysFile .ssh/authorized_keys",
                        "StrictModes yes",
                        "AllowAgentForwarding no",
                        "X11Forwarding no",
                        "PermitTunnel no",
                        "AllowTcpForwarding remote",
                        "AllowStreamLocalForwarding yes",
                        "StreamLocalBindUnlink yes",
                        "PrintMotd no",
                        "PrintLastLog no",
                        "Subsystem sftp internal-sftp",
                        "",
                    ]
                )
            )

    def _mount_script(self) -> str:
        """The shell script the host's init runs in its fresh mount namespace before it
        becomes the reaper."""
        q = shlex.quote
        hidden = ("/root/", "/home/", "/tmp/", "/var/tmp/")  # tmpfs on every host
        keep = []  # paths under a hidden directory that a checkout-seeing host must still see
        if self.sees_checkout:
            for path in sorted({CHECKOUT, sys.prefix, os.path.realpath(sys.base_prefix)}):
                if path.startswith(hidden) and not path.startswith(tuple(f"{k}/" for k in keep)):
                    keep.append(path)
        hide_work = []  # the checkout, and the venv that runs it (if it is one), elsewhere
        if not self.sees_checkout:
            venv = [sys.prefix] if sys.prefix != sys.base_prefix else []
            for path in ("/work", CHECKOUT, *venv):
                covered = (*hidden, *(f"{p}/" for p in hide_work))
                if os.path.isdir(path) and not path.startswith(covered) and path not in hide_work:
                    hide_work.append(path)
        lines = [
            "set -e",
            f"hostname {q(self.name)}",
            "mount -t tmpfs -o mode=755 tmpfs /run",
            "mkdir -m 755 /run/sshd /run/host /run/keep",
            f"mount --bind {q(str(self.system_dir))} /run/host",
        ]
        for i, path in enumerate(keep):
            lines += [f"mkdir /run/keep/{i}", f"mount --bind {q(path)} /run/keep/{i}"]
        for file in ("passwd", "group", "shadow", "hosts"):
            if Path("/etc", file).exists():
                lines.append(f"mount --bind /run/host/{file} /etc/{file}")
        lines += [
            "mount -t tmpfs -o mode=755 tmpfs /home",
            f"mkdir {q(self.home)}",
            f"mount --bind {q(str(self.home_dir))} {q(self.home)}",
            f"mount -t tmpfs -o mode={'755' if keep else '700'} tmpfs /root",
        ]
        lines += [f"mount -t tmpfs -o mode=755 tmpfs {q(p)}" for p in hide_work]
        lines += [
            f"mount -t tmpfs -o mode={mode} tmpfs {d}"
            for d, mode in (("/var/log", "755"), ("/var/tmp", "1777"), ("/dev/shm", "1777"))
            if os.path.isdir(d)
        ]
        lines.append("mount -t tmpfs -o mode=1777 tmpfs /tmp")
        for i, path in enumerate(keep):
            lines += [
                f"mkdir -p {q(path)}",
                f"mount --bind /run/keep/{i} {q(path)}",
                f"mount -o remount,bind,ro {q(path)}",
                f"umount /run/keep/{i}",
            ]
        lines += [
            "rmdir /run/keep/* /run/keep 2>/dev/null || rm -rf /run/keep",
            "echo ready",
            f"exec {q(_system_python())} -c {q(_REAPER)}",
        ]
        return "\n".join(lines) + "\n"

    def _start_init(self) -> None:
        log = open(self.state_dir / "init.log", "ab")  # noqa: SIM115 (closed below)
        try:
            self._init = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.netns,
                    "unshare",
                    "--mount",
                    "--pid",
                    "--uts",
                    "--ipc",
                    "--fork",
                    "--propagation",
                    "private",
                    "--mount-proc",
                    "/bin/sh",
                    "-c",
                    self._mount_script(),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=_root_env(),
                start_new_session=True,
            )
        finally:
            log.close()
        assert self._init.stdout is not None
        line = _read_line(self._init.stdout, 15)
        children = _children(self._init.pid)
        if line.strip() != b"ready" or len(children) != 1:
            _reap(self._init)
            log_text = (self.state_dir / "init.log").read_text(errors="replace")
            raise HarnessError(f"host {self.name}: init did not start: {line!r} {log_text}")
        self._init_pid = children[0]

    def _start_sshd(self) -> None:
        log_path = self.state_dir / "sshd.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            self._sshd = self.popen(
                [SSHD, "-D", "-e", "-f", "/run/host/sshd_config"],
                as_user=False,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 15
        while True:
            with open(log_path, "rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
            if "Server listening on" in text:
                return
            if self._sshd.poll() is not None or time.monotonic() > deadline:
                raise HarnessError(f"host {self.name}: sshd did not start: {text}")
            time.sleep(0.02)

    # -- running things inside ---------------------------------------------------------------

    def _argv(
        self,
        argv: Sequence[str],
        as_user: bool,
        env: Mapping[str, str] | None,
        cwd: str | None,
    ) -> list[str]:
        if not self._init_pid:
            raise HarnessError(f"host {self.name} is not running")
        if as_user:
            base = {"HOME": self.home, "USER": self.user, "LOGNAME": self.user, "PATH": USER_PATH}
            become = [f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups"]
        else:
            base = {"HOME": "/root", "USER": "root", "LOGNAME": "root", "PATH": ROOT_PATH}
            become = []
        full_env = {**base, "SHELL": "/bin/bash", "LANG": "C.UTF-8", **(env or {})}
        return [
            "nsenter",
            f"--target={self._init_pid}",
            "--mount",
            "--pid",
            "--net",
            "--uts",
            "--ipc",
            "--",
            # the command dies with the nsenter in front of it, so killing the Popen kills it
            "setpriv",
            "--pdeathsig=KILL",
            *become,
            "--",
            "env",
            "-i",
            f"--chdir={cwd or base['HOME']}",
            *[f"{key}={value}" for key, value in full_env.items()],
            *argv,
        ]

    def popen(
        self,
        argv: Sequence[str],
        *,
        as_user: bool = True,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        **kw: Any,
    ) -> HostProcess:
        """Start ``argv`` inside the host (as its user unless ``as_user=False``, in ``cwd`` or
        the home, with a clean environment plus ``env``); other keywords go to Popen.
        Signalling the returned process signals the command inside; a reboot or close kills
        it."""
        proc = HostProcess(self._argv(argv, as_user, env, cwd), env=_root_env(), **kw)
        with self._lock:
            self._popens.append(proc)
        return proc

    def run(
        self,
        argv: Sequence[str],
        *,
        as_user: bool = True,
        env: Mapping[str, str] | None = None,
        input: bytes | None = None,
        timeout: float = 60,
        check: bool = True,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` inside the host and return its output (HostCommandError on a non-zero
        exit when ``check``; subprocess.TimeoutExpired, after killing it, on ``timeout``)."""
        with HostProcess(
            self._argv(argv, as_user, env, cwd),
            env=_root_env(),
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as proc:
            try:
                stdout, stderr = proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise
        done = subprocess.CompletedProcess(list(argv), proc.returncode, stdout, stderr)
        if check and done.returncode != 0:
            raise HostCommandError(self.name, done)
        return done

    def sh(self, script: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
        """``run(["sh", "-c", script], ...)``."""
        return self.run(["sh", "-c", script], **kw)

    def python(self) -> str:
        """The interpreter a host-side command should use for checkout code (needs
        sees_checkout) — the venv the tests run in."""
        if not self.sees_checkout:
            raise HarnessError(f"host {self.name} does not see the checkout")
        return CHECKOUT_PYTHON

    def narrative(self) -> str:
        """The checkout's ``narrative`` command (needs sees_checkout; use with checkout_env)."""
        return str(Path(self.python()).with_name("narrative"))

    def checkout_env(self) -> dict[str, str]:
        """Environment that makes ``python()`` import this checkout's packages."""
        return {"PYTHONPATH": CHECKOUT}

    # -- files ---------------------------------------------------------------------------------

    def path(self, inside: str) -> str:
        """The machine-side path of ``inside`` as this host sees it (through its init's root:
        valid until the next reboot)."""
        if not inside.startswith("/"):
            raise ValueError(f"want an absolute path inside the host, got {inside!r}")
        if not self._init_pid:
            raise HarnessError(f"host {self.name} is not running")
        return f"/proc/{self._init_pid}/root{inside}"

    def write_file(
        self, inside: str, data: bytes | str, *, mode: int = 0o644, as_user: bool = True
    ) -> None:
        """Write ``data`` to ``inside`` (missing parents created), owned by the host's user
        unless ``as_user=False``."""
        target = Path(self.path(inside))
        missing = [p for p in reversed(target.parents) if not p.exists()]
        for directory in missing:
            directory.mkdir(mode=0o755)
            if as_user:
                os.chown(directory, self.uid, self.gid)
        target.write_bytes(data.encode() if isinstance(data, str) else data)
        os.chmod(target, mode)
        if as_user:
            os.chown(target, self.uid, self.gid)

    def know(self, name: str, address: str) -> None:
        """Resolve ``name`` to ``address`` on this host (its private ``/etc/hosts``)."""
        with open(self.system_dir / "hosts", "a") as hosts:
            hosts.write(f"{address} {name}\n")

    def read_file(self, inside: str) -> bytes:
        return Path(self.path(inside)).read_bytes()

    # -- sshd --------------------------------------------------------------------------------

    def _require_sshd(self) -> None:
        if not self.has_sshd:
            raise HarnessError(f"host {self.name} was made without sshd")

    def host_key_line(self) -> str:
        """A known_hosts line for this host's sshd."""
        self._require_sshd()
        key = (self.system_dir / "ssh_host_ed25519_key.pub").read_text().split()
        where = self.address if self.sshd_port == 22 else f"[{self.address}]:{self.sshd_port}"
        return f"{where} {key[0]} {key[1]}"

    def host_key_fingerprint(self) -> str:
        """``SHA256:...`` of the host key, as ``ssh-keygen -lf`` prints it."""
        self._require_sshd()
        return _cmd("ssh-keygen", "-lf", str(self.system_dir / "ssh_host_ed25519_key.pub")).split()[
            1
        ]

    def authorize(self, public_key_line: str) -> None:
        """Append a key to the user's ~/.ssh/authorized_keys (0700 dir, 0600 file, theirs)."""
        ssh_dir = self.home_dir / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(ssh_dir, self.uid, self.gid)
        keys = ssh_dir / "authorized_keys"
        with open(keys, "a") as out:
            out.write(public_key_line.strip() + "\n")
        os.chmod(keys, 0o600)
        os.chown(keys, self.uid, self.gid)

    def sshd_log(self) -> str:
        log = self.state_dir / "sshd.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def stop_sshd(self) -> None:
        """SIGTERM the listening sshd (open sessions stay, as on a real server)."""
        self._require_sshd()
        if self._sshd is not None:
            self._sshd.terminate()
            try:
                self._sshd.wait(10)
            except subprocess.TimeoutExpired:
                _reap(self._sshd)
            self._sshd = None

    def restart_sshd(self) -> None:
        """Stop the listening sshd and start it again (same keys and config)."""
        self.stop_sshd()
        self._start_sshd()

    # -- faults --------------------------------------------------------------------------------

    def link_down(self) -> None:
        """Unplug the host's cable (its switch port goes down; packets vanish both ways)."""
        _cmd("ip", "-n", self.network.switch_ns, "link", "set", self.switch_port, "down")

    def link_up(self) -> None:
        _cmd("ip", "-n", self.network.switch_ns, "link", "set", self.switch_port, "up")

    def netem(self, *, delay_ms: int = 0, loss_pct: float = 0) -> None:
        """Delay frames on the host's link by ``delay_ms`` in each direction (round trips
        grow by twice that) and drop ``loss_pct`` % of them, each direction on its own, until
        ``clear_netem``. Works like ``tc netem`` on both ends of the cable, done in user space
        by a link emulator in the switch namespace because this kernel lacks sch_netem."""
        sw, port, spare = self.network.switch_ns, self.switch_port, f"r{self.index}"
        if not self._spare_link:
            _cmd(
                "ip",
                "-n",
                sw,
                "link",
                "add",
                spare,
                "type",
                "veth",
                "peer",
                "name",
                f"b{self.index}",
            )
            _cmd("ip", "-n", sw, "link", "set", spare, "up")
            self._spare_link = True
        self._stop_link_emulator()
        self._link_emulator = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                sw,
                _system_python(),
                "-c",
                _LINK_EMULATOR,
                port,
                spare,
                str(delay_ms),
                str(loss_pct),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=_root_env(),
        )
        assert self._link_emulator.stdout is not None
        if _read_line(self._link_emulator.stdout, 15).strip() != b"ready":
            self._stop_link_emulator()
            raise HarnessError(f"host {self.name}: the link emulator did not start")
        # the host's traffic now reaches the bridge only through the emulator
        _cmd("ip", "-n", sw, "link", "set", port, "nomaster", "promisc", "on")
        _cmd("ip", "-n", sw, "link", "set", f"b{self.index}", "master", "br0", "up")

    def clear_netem(self) -> None:
        """Wire the host straight to the bridge again."""
        if self._link_emulator is None:
            return
        sw = self.network.switch_ns
        _cmd("ip", "-n", sw, "link", "set", f"b{self.index}", "nomaster")
        _cmd("ip", "-n", sw, "link", "set", self.switch_port, "master", "br0", "promisc", "off")
        self._stop_link_emulator()

    def _stop_link_emulator(self) -> None:
        if self._link_emulator is not None:
            _reap(self._link_emulator)
            self._link_emulator = None

    def reboot(self) -> None:
        """Kill every process of the host, then start it afresh: /tmp (and /run, /var/tmp,
        /dev/shm) empty, the home and system files as they were, sshd again if it had one."""
        self._shutdown()
        self._close_popens(close_pipes=False)
        self._start_init()
        if self.has_sshd:
            self._start_sshd()

    def pids(self) -> list[int]:
        """Machine-side pids of every process in the host's network namespace."""
        return _netns_pids(self.netns)

    # -- the test process's own sockets ------------------------------------------------------

    @contextlib.contextmanager
    def enter_net(self) -> Iterator[None]:
        """Move the calling thread (only) into the host's network namespace for the block, so
        sockets it opens there are on the test network (files and processes stay the
        machine's). Threads started inside do not inherit it."""
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.netns}", os.O_RDONLY)
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                raise HarnessError(f"setns: {os.strerror(ctypes.get_errno())}")
            try:
                yield
            finally:
                if libc.setns(own, _CLONE_NEWNET) != 0:
                    raise HarnessError(f"setns back: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(target)
            os.close(own)

    # -- teardown ------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Kill init (the PID namespace dies with it) and anything else in the netns."""
        if self._init is not None:
            if self._init_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._init_pid, signal.SIGKILL)
            # unshare exits once it has reaped init: killing it first would orphan init
            _reap(self._init, grace=10)
        self._init = None
        self._init_pid = 0
        self._sshd = None
        if self.netns:
            _kill_netns_processes(self.netns)

    def _close_popens_and_link(self) -> None:
        self._stop_link_emulator()
        self._close_popens()

    def _close_popens(self, close_pipes: bool = True) -> None:
        """Reap the processes ``popen`` started (dead by now); their pipes too unless the
        caller may still read them (after a reboot)."""
        with self._lock:
            popens, self._popens = self._popens, []
        for proc in popens:
            _reap(proc, close_pipes=close_pipes)
