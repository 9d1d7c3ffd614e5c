"""Which file names conventionally hold credentials (the name half of the secret scanner).

One rule for everything that must keep secrets where they are: the E2B provider refuses to
upload such files, and the gateway refuses to serve them to a remote reader. A path is
credential-like when its name matches :data:`CREDENTIAL_NAMES` (``.env*``, ``*.pem``,
``*.key``, ``id_rsa*``, ``.netrc``, ``credentials``...; compared lower-cased) or when it lies in
a credentials directory (:data:`CREDENTIAL_DIRS`: ``.aws/``, ``.ssh/``, ``.gnupg/``...; or
below :data:`CREDENTIAL_PREFIXES`). The rule errs on the side of refusing.
"""

from __future__ import annotations

import fnmatch
from typing import Final

__all__ = [
    "CREDENTIAL_DIRS",
    "CREDENTIAL_NAMES",
    "CREDENTIAL_PREFIXES",
    "credential_name_problem",
    "is_credential_name",
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


def credential_name_problem(path: str) -> str | None:
    """Why the normalised relative ``path`` (``/``-separated) looks like it holds credentials,
    or None when its name does not."""
    parts = path.split("/")
    if any(part in CREDENTIAL_DIRS for part in parts[:-1]) or path.startswith(CREDENTIAL_PREFIXES):
        return "it lies in a credentials directory"
    name = parts[-1].lower()
    if any(fnmatch.fnmatch(name, pattern) for pattern in CREDENTIAL_NAMES):
        return "files named like this hold credentials"
    return None


def is_credential_name(path: str) -> bool:
    """Whether :func:`credential_name_problem` finds ``path`` credential-like."""
    return credential_name_problem(path) is not None
