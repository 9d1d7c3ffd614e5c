"""Configuration of the E2B provider, and the rule that keeps credentials out of sandboxes.

A sandbox is someone else's machine. Project configuration the agent needs there (such as the
gateway's ``proxyExecution.json``) is uploaded by listing it in ``upload``; credentials never
are. :func:`check_upload_name` refuses, by name, anything that conventionally holds secrets
(``.env*``, ``*.pem``/``*.key``/``*.p12``/``*.pfx``, ``id_rsa*``/``id_ed25519*``/``id_ecdsa*``/
``id_dsa*``, ``.netrc``, ``.npmrc``, ``.pypirc``, ``.git-credentials``, ``credentials*``,
anything under ``.aws/``, ``.ssh/``, ``.gnupg/``, ``.docker/``, ``.kube/``, ``.config/gcloud/``),
and :func:`check_upload_content` refuses files whose content looks like it holds a key (a
private-key block, a cloud or API token in a known format, or a ``key``/``secret``/``token``/
``password``-like field set to a literal value). Both run before anything is sent, so a refused
list uploads nothing. The rule errs on the side of refusing: reference secrets through
environment variables (``"${NAME}"``) instead of writing them into uploaded files. The name rule
is :mod:`narrative.credentials`, shared with the gateway's file reads.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import Literal

from pydantic import Field, field_validator

from narrative.credentials import TOKEN_PATTERNS, credential_name_problem
from narrative.errors import InvalidInput

from .base import ProviderConfig, check_relative_path

__all__ = [
    "DEFAULT_WORKDIR",
    "E2BConfig",
    "absolute_workdir",
    "check_upload_content",
    "check_upload_name",
    "env_var_name",
    "read_uploads",
]

DEFAULT_WORKDIR = "/home/user/workspace"

# The shared token shapes, plus a secret-looking field: what a config file for upload must
# not hold (a result file may: it is screened by the shapes only).
_SECRET_PATTERNS = (
    *TOKEN_PATTERNS,
    # A secret-looking field (JSON, YAML, INI, env) assigned a literal of 8+ characters; values
    # that reference the environment ("${NAME}", "$NAME", "env:NAME") are fine.
    re.compile(
        rb"""(?ix)
        ["']?[a-z0-9_.-]*(api[_-]?key|secret|token|passw(or)?d|credential|private[_-]?key)
        [a-z0-9_.-]*["']?\s*[:=]\s*["']?(?!\$|env:)[^\s"',}{]{8,}
        """
    ),
)


def check_upload_name(path: str) -> str:
    """Normalise an upload path; refuse absolute, escaping or credential-like ones."""
    norm = check_relative_path(path)
    reason = credential_name_problem(norm)
    if reason is not None:
        raise InvalidInput(f"refusing to upload {path}: {reason}")
    return norm


def check_upload_content(path: str, data: bytes) -> None:
    """Refuse a file whose content looks like it holds a key or token (the value never shown)."""
    for pattern in _SECRET_PATTERNS:
        if pattern.search(data):
            raise InvalidInput(
                f"refusing to upload {path}: its content looks like it holds a credential; "
                "reference secrets through environment variables instead"
            )


def read_uploads(
    workspace: str, names: list[str], skip: set[str] | None = None
) -> list[tuple[str, bytes]]:
    """The configured project files ``names`` (relative to ``workspace``) as ``(path, data)``,
    all read and checked before the caller sends any; those in ``skip`` are left out."""
    files: list[tuple[str, bytes]] = []
    for rel in names:
        norm = check_upload_name(rel)
        if skip and norm in skip:
            continue
        local = os.path.join(workspace, *norm.split("/"))
        try:
            with open(local, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise InvalidInput(f"configured upload {rel} does not exist in the workspace") from None
        check_upload_content(rel, data)
        files.append((norm, data))
    return files


def absolute_workdir(value: str) -> str:
    """A sandbox workdir, normalised: absolute and below ``/`` (a pydantic validator's body)."""
    norm = posixpath.normpath(value)
    if not norm.startswith("/") or norm == "/":
        raise ValueError("workdir must be an absolute path below /")
    return norm


def env_var_name(value: str) -> str:
    """The name of the variable holding an API key, never the key (a validator's body)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError("api_key_env must name an environment variable, not hold a key")
    return value


class E2BConfig(ProviderConfig):
    """An E2B sandbox per environment."""

    type: Literal["e2b"] = "e2b"
    template: str | None = None
    """Sandbox template name or id (``None``: E2B's default ``base`` template)."""
    timeout: int = Field(default=3600, ge=1)
    """Seconds the sandbox may live before E2B ends it (renewed on start)."""
    workdir: str = DEFAULT_WORKDIR
    """Absolute path of the workspace inside the sandbox."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables for every command (not secrets: records persist them)."""
    metadata: dict[str, str] = Field(default_factory=dict)
    """Extra sandbox metadata; ``narrative.owner``/``narrative.env`` are always added."""
    api_key_env: str = "E2B_API_KEY"
    """Name of the environment variable holding the API key; the key itself is never stored."""
    upload: list[str] = Field(default_factory=list)
    """Project config files (relative to the workspace) uploaded on create and start, e.g.
    ``proxyExecution.json``. Credentials are refused (see the module docstring)."""
    extra_capabilities: list[str] = Field(default_factory=list)
    """Capabilities the template adds (``gpu``, ``browser``, ...)."""
    runtime: list[str] | None = None
    """argv prefix that runs the narrative CLI in the environment
    (default: ``narrative`` on the sandbox's PATH)."""

    @field_validator("workdir")
    @classmethod
    def _absolute_workdir(cls, value: str) -> str:
        return absolute_workdir(value)

    @field_validator("upload")
    @classmethod
    def _safe_uploads(cls, value: list[str]) -> list[str]:
        return [check_upload_name(path) for path in value]

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        return env_var_name(value)
