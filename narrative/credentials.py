"""The secret scanner: which files hold credentials, by name and by content.

One rule for everything that must keep secrets where they are: the E2B provider refuses to
upload such files, the gateway refuses to serve them to a remote reader, and a run's result
comes home without them (:func:`narrative.runs.withhold_secrets`).

* **Name**: a path is credential-like when its name matches :data:`CREDENTIAL_NAMES`
  (``.env*``, ``*.pem``, ``*.key``, ``id_rsa*``, ``.netrc``, ``credentials``...; compared
  lower-cased) or when it lies in a credentials directory (:data:`CREDENTIAL_DIRS`: ``.aws/``,
  ``.ssh/``, ``.gnupg/``...; or below :data:`CREDENTIAL_PREFIXES`).
* **Content**: a PEM private-key block, a token of a well-known shape (:data:`TOKEN_PATTERNS`:
  AWS access key ids, GitHub, GitLab, Slack, Google, E2B and ``sk-`` API keys, and this
  project's own ``ng2`` gateway tokens), or one of the exact secrets the caller knows (a run's
  tokens, the gateway key in the encodings an agent would dump it in, see
  :func:`secret_forms`). Only the first :data:`SCAN_LIMIT` bytes of a file are read.

The rules err on the side of refusing. They find secrets written by accident (an environment
dump, a copied key), not ones an agent disguises on purpose (encoded, split): nothing can.
"""

from __future__ import annotations

import base64
import fnmatch
import re
from collections.abc import Iterable
from typing import Final

__all__ = [
    "CREDENTIAL_DIRS",
    "CREDENTIAL_NAMES",
    "CREDENTIAL_PREFIXES",
    "SCAN_LIMIT",
    "TOKEN_PATTERNS",
    "credential_name_problem",
    "is_credential_name",
    "secret_content_problem",
    "secret_forms",
]

#: File name patterns (``fnmatch``, matched against the lower-cased name).
CREDENTIAL_NAMES: Final = (
    ".env",
    ".env.*",
    "*.env",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.keystore",
    "*.jks",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".netrc",
    "_netrc",
    ".npmrc",
    ".pypirc",
    ".git-credentials",
    ".htpasswd",
    "credentials",
    "credentials.*",
    "*.tfvars",
)
#: Directories whose whole content is credentials, at any depth.
CREDENTIAL_DIRS: Final = frozenset({".aws", ".ssh", ".gnupg", ".docker", ".kube", ".azure"})
#: Relative path prefixes whose whole content is credentials.
CREDENTIAL_PREFIXES: Final = (".config/gcloud/",)
# the name patterns as one regex (fnmatch's own translation): one match per path, not twenty
_NAME_RULE: Final = re.compile("|".join(fnmatch.translate(p) for p in CREDENTIAL_NAMES))


def credential_name_problem(path: str) -> str | None:
    """Why the normalised relative ``path`` (``/``-separated) looks like it holds credentials,
    or None when its name does not."""
    parts = path.split("/")
    if any(part in CREDENTIAL_DIRS for part in parts[:-1]) or path.startswith(CREDENTIAL_PREFIXES):
        return "it lies in a credentials directory"
    if _NAME_RULE.match(parts[-1].lower()):
        return "files named like this hold credentials"
    return None


def is_credential_name(path: str) -> bool:
    """Whether :func:`credential_name_problem` finds ``path`` credential-like."""
    return credential_name_problem(path) is not None


#: Bytes of a file the content rule reads (a secret further in is not found).
SCAN_LIMIT: Final = 32 << 20
#: Keys and tokens in well-known formats, each with the literals one of which it must contain
#: (a fast substring search picks the few regexes worth running); the value is never shown.
_SHAPES: Final = (
    ((b"PRIVATE KEY",), rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----"),
    ((b"AKIA", b"ASIA"), rb"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    ((b"ghp_", b"gho_", b"ghu_", b"ghs_", b"ghr_"), rb"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),  # GitHub
    ((b"github_pat_",), rb"\bgithub_pat_[A-Za-z0-9_]{30,}\b"),
    ((b"xox",), rb"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),  # Slack
    ((b"sk-",), rb"\bsk-[A-Za-z0-9_-]{20,}\b"),  # OpenAI / Anthropic style API keys
    ((b"e2b_",), rb"\be2b_[0-9a-f]{20,}\b"),  # E2B API keys
    ((b"AIza",), rb"\bAIza[0-9A-Za-z_-]{35}\b"),  # Google API keys
    ((b"glpat-",), rb"\bglpat-[A-Za-z0-9_-]{20,}\b"),  # GitLab
    # our own gateway tokens: ng2.<claims>.<HMAC-SHA256>, base64url unpadded (gateway.tokens)
    ((b"ng2.",), rb"\bng2\.[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])"),
)
TOKEN_PATTERNS: Final = tuple(re.compile(pattern) for _literals, pattern in _SHAPES)
"""The shapes as compiled regexes (the E2B upload check adds its own to these)."""


def secret_forms(secret: bytes) -> list[bytes]:
    """``secret`` as it would appear in a file: as is, and (for binary key material) in hex
    and base64, the encodings a dump would use. Secrets under 8 bytes are left out (they
    would match by chance)."""
    if len(secret) < 8:
        return []
    forms = [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
    ]
    return list(dict.fromkeys(forms))


def secret_content_problem(data: bytes, known: Iterable[bytes] = ()) -> str | None:
    """Why the content ``data`` looks like it holds a credential (never quoting it), or None.

    ``known`` are exact secrets to look for (each as :func:`secret_forms` gives them).
    """
    head = memoryview(data)[:SCAN_LIMIT].tobytes() if len(data) > SCAN_LIMIT else data
    for secret in known:
        if secret and secret in head:
            return "it holds a token or key of this run"
    for (literals, _pattern), compiled in zip(_SHAPES, TOKEN_PATTERNS, strict=True):
        if any(literal in head for literal in literals) and compiled.search(head):
            if literals[0] == b"PRIVATE KEY":
                return "it holds a private key"
            return "it holds a token in a well-known format"
    return None
