"""Configuration of the ``ssh`` provider, kept apart from the provider so that it can be
validated (CLI, environment records) without ``asyncssh`` installed."""

from __future__ import annotations

import posixpath
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..base import ProviderConfig
from ..shipping import DEFAULT_MAX_COLLECT_BYTES

__all__ = ["FINGERPRINT", "SSHConfig", "SSHSessionSettings"]

FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
"""A host key fingerprint as ``ssh-keygen -lf`` prints it."""


class SSHSessionSettings(BaseModel):
    """How to log in and what to run on a host, whoever names the host: the settings the
    ``ssh`` provider shares with ``cloud-vm`` (which launches the host first)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    user: str | None = None
    """Remote user name (default: the local user's name)."""
    key_file: str | None = None
    """Private key to log in with (default: ``~/.ssh/id_ed25519``, else ``~/.ssh/id_rsa``).
    Only this key is offered; no SSH agent is used or forwarded."""
    work_dir: str = "~/.narrative"
    """Remote directory for environments (``envs/<id>``) and the runtime (``runtime/``);
    ``~`` is the remote user's home."""
    python: str = "python3"
    """Remote Python 3.11+ that installs and runs the runtime."""
    runtime: list[str] | None = None
    """argv prefix running the narrative CLI on the remote (default: the runtime installed
    under ``work_dir`` from the wheelhouse, when missing)."""
    wheelhouse: str | None = None
    """Local directory of wheels (narrative-engine and its dependencies, for the remote's
    Python and architecture) installed on the remote when it has no runtime (default: one
    built on this machine with ``pip wheel`` on first use and cached)."""
    hub: Literal["tunnel", "direct"] = "tunnel"
    """How the runtime reaches the hub: ``tunnel`` (default), a unix socket forwarded back
    through the SSH connection, so the host needs no route to the hub; ``direct``, the hub's
    own (advertised) URL."""
    sandbox: Literal["bwrap", "none"] = "bwrap"
    """``bwrap`` (default): every command runs under bubblewrap on the host, seeing of the
    remote user's files only its own workspace, ``/tmp`` and the runtime, and none of the
    user's processes (the host needs ``bwrap``; creating is refused without it); ``none``:
    commands run with everything the remote user can reach, other environments included."""
    network: Literal["host", "none"] = "host"
    """With the sandbox: ``host``, the host's network; ``none``, only a loopback of its own
    (runs through the hub still work: the runtime reaches it through the tunnel's socket)."""
    connect_timeout: float = Field(default=15.0, gt=0)
    """Seconds to wait for the SSH connection and login."""
    env: dict[str, str] = Field(default_factory=dict)
    """Variables set for every command run in the environment."""
    max_collect_bytes: int = Field(default=DEFAULT_MAX_COLLECT_BYTES, gt=0)
    """Upper bound on the file bytes a collect accepts from the host."""

    @field_validator("work_dir")
    @classmethod
    def _work_dir(cls, value: str) -> str:
        if "\x00" in value or "\n" in value:
            raise ValueError("work_dir must be a plain path")
        rest = value[2:] if value.startswith("~/") else value
        if value != "~" and not value.startswith(("/", "~/")):
            raise ValueError(f"work_dir must be absolute or start with ~/ ({value!r})")
        norm = posixpath.normpath(rest)
        if norm.startswith("..") or value in ("/", "~"):
            raise ValueError(f"work_dir must be a directory below / or ~ ({value!r})")
        return value.rstrip("/")


class SSHConfig(ProviderConfig, SSHSessionSettings):
    """One directory per environment on a remote Linux host, driven over SSH."""

    type: Literal["ssh"] = "ssh"
    """Discriminator of the provider configs."""
    host: str = Field(min_length=1)
    """Address or name of the remote host."""
    port: int = Field(default=22, ge=1, le=65535)
    """Port of its SSH server."""
    known_hosts: str = "~/.ssh/known_hosts"
    """known_hosts file holding the host's key: the host key must be in it (strict, the
    default) or match ``host_key``."""
    host_key: str | None = None
    """The host key's fingerprint (``SHA256:...``) to trust on first use, as the refusal of
    an unknown host prints it: check it out of band before you pass it."""

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.:\[\]-]+", value) or value.startswith("-"):
            raise ValueError(f"not a host name or address: {value!r}")
        return value

    @field_validator("host_key")
    @classmethod
    def _host_key(cls, value: str | None) -> str | None:
        if value is not None and not FINGERPRINT.fullmatch(value):
            raise ValueError(f"host_key must be a SHA256:... fingerprint ({value!r})")
        return value
