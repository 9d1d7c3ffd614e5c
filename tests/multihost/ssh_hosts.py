"""A developer's machine and SSH hosts on the test network, for the ``ssh`` provider's tests.

``dev`` runs this checkout's ``narrative`` (its hub embedded or served) and holds the client
key; each box is a plain Linux host with ``sshd`` and the system ``python3`` only, so the
provider installs the runtime there from the wheelhouse ``dev`` sends.
"""

from __future__ import annotations

import functools
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from providers.ssh import install
from tests.multihost.hosts import Host, Network, SshKey

__all__ = ["Lab", "build_wheelhouse", "make_lab"]


@functools.cache
def build_wheelhouse(directory: str) -> Path:
    """narrative-engine and its dependencies as wheels (and pip's), built on the machine once
    per test session as the provider builds its own: the hosts have no route to a package
    index."""
    house = Path(directory)
    house.mkdir(parents=True, exist_ok=True)
    install.build_wheelhouse(house)
    return house


@dataclass
class Lab:
    network: Network
    dev: Host
    boxes: list[Host]
    wheels: str
    """The wheelhouse as ``dev`` sees it."""

    @property
    def box(self) -> Host:
        return self.boxes[0]

    def workspace(self, name: str = "proj") -> str:
        return f"{self.dev.home}/{name}"

    def narrative(
        self, *args: str, cwd: str | None = None, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[bytes]:
        return self.dev.run(
            [self.dev.narrative(), *args],
            env=self.dev.checkout_env(),
            cwd=cwd or self.workspace(),
            check=check,
            timeout=timeout,
        )

    def json(self, *args: str, cwd: str | None = None) -> Any:
        return json.loads(self.narrative(*args, "--json", cwd=cwd).stdout)

    def settings(self, box: Host | None = None, **extra: str) -> dict[str, str]:
        """The config of an ssh environment on ``box``."""
        box = box or self.box
        return {
            "host": box.address,
            "user": box.user,
            "key_file": f"{self.dev.home}/.ssh/id_ed25519",
            "wheelhouse": self.wheels,
            **extra,
        }

    def config(self, box: Host | None = None, **extra: str) -> list[str]:
        """``--config`` options of an ssh environment on ``box``."""
        settings = self.settings(box, **extra)
        return [part for k, v in settings.items() for part in ("--config", f"{k}={v}")]

    def init_workspace(self, files: dict[str, str], name: str = "proj") -> str:
        path = self.workspace(name)
        for rel, text in files.items():
            self.dev.write_file(f"{path}/{rel}", text)
        self.narrative("init", cwd=path)
        return path

    def assert_store_sound(self, cwd: str | None = None) -> None:
        """Stock git finds the developer's store sound (``fsck --strict``)."""
        store = self.json("info", cwd=cwd)["store"]
        fsck = self.dev.run(["git", "--git-dir", str(store), "fsck", "--strict"], check=False)
        assert fsck.returncode == 0, fsck.stderr.decode()

    def sh_on_box(self, script: str, box: Host | None = None) -> str:
        return (box or self.box).sh(script, check=False).stdout.decode()


def make_lab(network: Network, key: SshKey, wheelhouse: Path, boxes: int = 1) -> Lab:
    dev = network.add_host("dev", sees_checkout=True)
    hosts = [
        network.add_host(f"box{i + 1}" if boxes > 1 else "box", sshd=True) for i in range(boxes)
    ]
    dev.write_file(f"{dev.home}/.ssh/id_ed25519", key.private_bytes, mode=0o600)
    dev.write_file(
        f"{dev.home}/.ssh/known_hosts", "".join(h.host_key_line() + "\n" for h in hosts), mode=0o600
    )
    for host in hosts:
        host.authorize(key.public_line)
    wheels = f"{dev.home}/wheels"
    for wheel in sorted(wheelhouse.glob("*.whl")):
        dev.write_file(f"{wheels}/{wheel.name}", wheel.read_bytes())
    return Lab(network, dev, hosts, wheels)
