"""The default image of the ``docker`` provider, built offline, and the host runtime it uses.

No registry may be reachable, so the default image is not a distribution image: it is a
skeleton root file system (``/bin -> usr/bin`` and friends, ``/etc/passwd``, ``/tmp``), made
here and loaded with ``docker import``, that runs the host's own ``/usr``, Python and this
installation of narrative, bind-mounted read-only (:func:`host_runtime`). Nothing of the host
is writable from the container, and the store is never mounted. The mounts use fixed paths
inside the container (:data:`LIB_MOUNT`, :data:`VENV_MOUNT`), so a checkout or virtualenv that
lives under the container's workdir on the host (``/work/...``) does not collide with it.

An image of one's own works too (``--config image=NAME``): it needs Python 3.11+ with
narrative-engine installed (``docker/Dockerfile``), or ``--config runtime=...``.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base import RUNTIME_BOOTSTRAP
from .config import DEFAULT_IMAGE, DockerMount

__all__ = [
    "DEFAULT_IMAGE",
    "IMAGE_LABEL",
    "LIB_MOUNT",
    "PACKAGES",
    "VENV_MOUNT",
    "HostRuntime",
    "build_image",
    "host_runtime",
    "skeleton_rootfs",
]

IMAGE_LABEL = "narrative.image"
"""Label of the images :func:`build_image` makes (value ``host``)."""
LIB_MOUNT = "/opt/narrative/lib"
"""Where this installation's packages are mounted, each on its own (:data:`PACKAGES`)."""
VENV_MOUNT = "/opt/narrative/venv"
"""Where the host's virtualenv (when narrative runs from one) is mounted."""
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def skeleton_rootfs() -> bytes:
    """A root file system with nothing but what the host's ``/usr`` needs to run in it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(
            name: str, kind: bytes, mode: int = 0o755, data: bytes = b"", link: str = ""
        ) -> None:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = mode
            info.linkname = link
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for directory in ("etc", "usr", "work", "proc", "sys", "dev", "root", "opt"):
            add(directory, tarfile.DIRTYPE)
        add("tmp", tarfile.DIRTYPE, 0o1777)
        for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
            add(link, tarfile.SYMTYPE, 0o777, link=target)
        # A real directory, not a link into the read-only /usr: the daemon mounts its init
        # at /sbin/docker-init.
        add("sbin", tarfile.DIRTYPE)
        add("etc/passwd", tarfile.REGTYPE, 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        add("etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\n")
    return buf.getvalue()


def build_image(api: Any, tag: str = DEFAULT_IMAGE) -> str:
    """Load the skeleton image under ``tag`` (``repository:tag``) with the Engine API client
    ``api``, replacing an image of that tag; returns its id. Nothing is pulled."""
    repository, _, version = tag.rpartition(":")
    if not repository or "/" in version:
        repository, version = tag, "latest"
    changes = [f"LABEL {IMAGE_LABEL}=host", f"ENV PATH={_PATH}", "WORKDIR /work"]
    api.import_image_from_data(
        skeleton_rootfs(), repository=repository, tag=version, changes=changes
    )
    return str(api.inspect_image(f"{repository}:{version}")["Id"])


@dataclass(frozen=True)
class HostRuntime:
    """What a container needs to run the host's Python and narrative."""

    mounts: list[DockerMount]
    """Read-only bind mounts of the host's ``/usr``, Python and installation."""
    python: str
    """The Python interpreter, as the container sees it."""
    env: dict[str, str]
    """The container's ``PATH`` (the virtualenv's ``bin`` first) and ``PYTHONPATH`` (so an
    agent's ``python`` imports ``gateway.client``)."""

    @property
    def runtime(self) -> list[str]:
        """The argv prefix that runs the CLI (in isolated mode; see ``RUNTIME_BOOTSTRAP``)."""
        return [self.python, "-I", "-c", RUNTIME_BOOTSTRAP, LIB_MOUNT]


def host_runtime() -> HostRuntime:
    """The mounts and commands that run this process's Python and narrative in a container."""
    mounts = [DockerMount(source="/usr", target="/usr")]
    base = os.path.realpath(sys.base_prefix)
    if not _within(base, "/usr"):
        mounts.append(DockerMount(source=base, target=base))
    python = sys.executable
    path = _PATH
    if sys.prefix != sys.base_prefix:  # a virtualenv: its pyvenv.cfg finds the base Python
        mounts.append(DockerMount(source=os.path.realpath(sys.prefix), target=VENV_MOUNT))
        python = f"{VENV_MOUNT}/bin/{os.path.basename(sys.executable)}"
        path = f"{VENV_MOUNT}/bin:{_PATH}"
    # each package on its own: the directory holding them may be a whole checkout (.git...)
    root = _package_root()
    for package in PACKAGES:
        mounts.append(DockerMount(source=str(root / package), target=f"{LIB_MOUNT}/{package}"))
    return HostRuntime(mounts, python, {"PATH": path, "PYTHONPATH": LIB_MOUNT})


PACKAGES = ("narrative", "transfer", "providers", "gateway", "cli")
"""The top-level packages of narrative-engine."""


def _package_root() -> Path:
    """The directory holding the ``narrative``, ``cli``, ... packages of this installation."""
    import narrative

    return Path(narrative.__file__).resolve().parent.parent


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")
