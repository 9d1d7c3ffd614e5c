"""The runtime on an SSH host: installed from a wheelhouse this machine sends, never from the
network of the host.

The runtime lives in ``<work_dir>/runtime/<key>``, a virtual environment of the host's Python
with narrative-engine and its dependencies installed by the pip wheel of the wheelhouse
(``--no-index``). ``<key>`` names exactly the code this machine runs (its version and a digest
of its modules), so a host never runs an older runtime than the client expects, and hosts
serving several clients keep one runtime per version. An install goes into a temporary
directory renamed into place at the end: a killed install leaves no half runtime behind.

The wheelhouse is the configured directory, else one built here on first use with
``pip wheel`` (from the checkout when narrative runs from one, else from the package index
this machine can reach) and cached. Before anything is sent, its wheels are checked against
the host's Python version and architecture: a mismatch is refused with a clear message.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from platformdirs import user_cache_dir

from ..base import RUNTIME_BOOTSTRAP
from ..errors import ProviderError
from .target import quote_argv

if TYPE_CHECKING:
    from .session import Session

__all__ = [
    "build_wheelhouse",
    "check_installable",
    "ensure_runtime",
    "runtime_installed",
    "interpreter_prefix",
    "runtime_argv",
    "runtime_dir",
    "runtime_key",
    "wheelhouse",
]

_PACKAGES = ("narrative", "transfer", "gateway", "providers", "cli")
_DISTRIBUTION = "narrative-engine"


def _code_root() -> Path:
    """The directory holding this installation's packages (a checkout or site-packages)."""
    return Path(__file__).resolve().parents[2]


@functools.cache
def runtime_key() -> str:
    """``<version>-<digest>``: the version of this installation and a digest of its modules."""
    digest = hashlib.sha256()
    root = _code_root()
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.suffix in (".py", ".json", ".c") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(root)).encode() + b"\0")
                digest.update(path.read_bytes())
    try:
        version = importlib.metadata.version(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    return f"{version}-{digest.hexdigest()[:12]}"


def runtime_dir(work_dir: str) -> str:
    return f"{work_dir}/runtime/{runtime_key()}"


def runtime_argv(work_dir: str) -> list[str]:
    """How the installed runtime starts: its Python in isolated mode (no workspace file can
    shadow one of its modules), with its site-packages (the ``root`` link) put back."""
    base = runtime_dir(work_dir)
    return [f"{base}/bin/python", "-I", "-c", RUNTIME_BOOTSTRAP, f"{base}/root"]


def wheelhouse(configured: str | None) -> Path:
    """The wheelhouse to send: the configured one, else one built here and cached."""
    if configured:
        path = Path(os.path.expanduser(configured))
        if not any(path.glob("*.whl")):
            raise ProviderError(f"the wheelhouse {path} holds no wheels")
        return path
    path = Path(user_cache_dir("narrative")) / "wheelhouse" / runtime_key()
    if (path / "complete").exists():
        return path
    # built beside its final place, so that the rename below is atomic on one file system
    path.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix="wheelhouse-", dir=path.parent))
    try:
        build_wheelhouse(building)
        (building / "complete").write_text(runtime_key())
        with contextlib.suppress(OSError):  # another process built it meanwhile
            building.rename(path)
    finally:
        shutil.rmtree(building, ignore_errors=True)  # (gone already once renamed)
    return path


def build_wheelhouse(directory: Path) -> None:
    """narrative-engine and its dependencies as wheels, and pip's, with ``pip wheel``: from the
    checkout when this runs from one, else from the package index."""
    root = _code_root()
    source = (
        str(root)
        if (root / "pyproject.toml").exists()
        else f"{_DISTRIBUTION}=={runtime_key().split('-')[0]}"
    )
    for what in (source, "pip"):
        done = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "-w", str(directory), what],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            raise ProviderError(f"could not build the wheelhouse for ssh hosts: {tail}")


_WHEEL = re.compile(
    r"^(?P<name>[^-]+)-[^-]+(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$"
)


def check_wheels(house: Path, version: tuple[int, int], machine: str, host: str) -> None:
    """Refuse a wheelhouse whose binary wheels do not fit the host's Python and architecture."""
    wanted = f"cp{version[0]}{version[1]}"
    for wheel in sorted(house.glob("*.whl")):
        match = _WHEEL.match(wheel.name)
        if match is None or match["plat"] == "any":
            continue
        tags = match["py"].split(".") + match["abi"].split(".")
        python_ok = wanted in tags or "abi3" in tags
        platform_ok = machine in match["plat"]
        if not (python_ok and platform_ok):
            raise ProviderError(
                f"the wheelhouse {house} does not fit {host}, which runs Python "
                f"{version[0]}.{version[1]} on {machine}: {wheel.name} is built for another "
                f"Python or architecture; build one for the host (pip wheel --python-version "
                f"{version[0]}.{version[1]} --platform manylinux2014_{machine} --only-binary "
                f":all: ...) and pass --config wheelhouse=DIR"
            )


_PIP_INSTALL = (
    "install",
    "--quiet",
    "--no-index",
    "--no-cache-dir",
    "--disable-pip-version-check",
    "--find-links",
)
_PROBE = "import platform, sys; print(sys.version_info[0], sys.version_info[1], platform.machine())"


def runtime_installed(session: Session, work_dir: str) -> bool:
    """Whether the runtime this machine expects is on the host (asked once a process)."""
    base = runtime_dir(work_dir)
    if base in session.runtimes:
        return True
    probe = quote_argv([f"{base}/bin/python", "-I", "-c", "pass"])
    if session.run(f"test -e {quote_argv([base + '/root'])} && {probe}", timeout=60).exit_code:
        return False
    session.runtimes.add(base)
    return True


def check_installable(
    session: Session, python: str, configured: str | None
) -> tuple[Path, tuple[int, int]]:
    """The wheelhouse to install from and the host's Python version; refused when the host's
    Python is too old or the wheels do not fit it."""
    out = session.check(
        quote_argv([python, "-c", _PROBE]), f"running {python} on the host", timeout=60
    )
    try:
        major, minor, machine = out.decode().split()
        version = (int(major), int(minor))
    except ValueError:
        raise ProviderError(
            f"ssh {session.target.label}: unexpected answer from {python}: {out[:200]!r}"
        ) from None
    if version < (3, 11):
        raise ProviderError(
            f"ssh {session.target.label}: {python} is Python {major}.{minor}; "
            "the runtime needs 3.11+ (set --config python=...)"
        )
    house = wheelhouse(configured)
    check_wheels(house, version, machine, session.target.label)
    return house, version


def ensure_runtime(session: Session, python: str, work_dir: str, configured: str | None) -> None:
    """Install the runtime on the host unless the one this machine expects is there."""
    if runtime_installed(session, work_dir):
        return
    base = runtime_dir(work_dir)
    house, version = check_installable(session, python, configured)
    partial = f"{base}.partial-{os.getpid()}"
    staging = f"{partial}/wheels"
    with tempfile.TemporaryFile() as tar:
        with tarfile.open(fileobj=tar, mode="w") as archive:
            for wheel in sorted(house.glob("*.whl")):
                archive.add(wheel, arcname=wheel.name)
        tar.seek(0)
        result = session.run(
            f"rm -rf {quote_argv([partial])} && mkdir -p {quote_argv([staging])} && "
            f"tar -x -C {quote_argv([staging])}",
            stdin=tar,
            timeout=600,
        )
    if result.exit_code != 0:
        detail = result.stderr.decode(errors="replace").strip()
        raise ProviderError(
            f"ssh {session.target.label}: uploading the wheelhouse failed: {detail}"
        )
    pip_wheels = sorted(p.name for p in house.glob("pip-*.whl"))
    if not pip_wheels:
        raise ProviderError(f"the wheelhouse {house} has no pip wheel to install with")
    pip = posixpath.join(staging, pip_wheels[-1], "pip")  # pip runs from its own wheel
    site = f"lib/python{version[0]}.{version[1]}/site-packages"
    install = (
        f"{quote_argv([python, '-m', 'venv', '--without-pip', partial])} && "
        f"{quote_argv([partial + '/bin/python', pip, *_PIP_INSTALL, staging, _DISTRIBUTION])} && "
        f"ln -s {quote_argv([site])} {quote_argv([partial + '/root'])} && "
        f"rm -rf {quote_argv([staging])} && "
        f"rm -rf {quote_argv([base])} && mv {quote_argv([partial])} {quote_argv([base])}"
    )
    session.check(install, "installing the runtime from the wheelhouse", timeout=600)
    session.runtimes.add(base)


def interpreter_prefix(session: Session, work_dir: str) -> str:
    """Where the runtime's base Python lives on the host (its ``sys.base_prefix``), which a
    sandbox hiding the home directory must bind back when it lies there (pyenv, say)."""
    base = runtime_dir(work_dir)
    if base not in session.prefixes:
        argv = [f"{base}/bin/python", "-I", "-c", "import sys; print(sys.base_prefix)"]
        out = session.check(quote_argv(argv), "asking the runtime's Python for its prefix")
        session.prefixes[base] = out.decode().strip()
    return session.prefixes[base]
