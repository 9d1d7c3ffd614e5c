"""TLS for the hub's WebSocket transport: the one place that builds SSL contexts.

Servers: :class:`ServerTls` loads a certificate and key (``narrative serve --tls-cert/--tls-key``)
or :func:`self_signed_certificate` makes one once and keeps it (``--tls-self-signed``).

Clients: :func:`client_ssl_context` is what every dialer of a ``wss://`` URL uses. With a pinned
fingerprint the certificate's SHA-256 must match exactly (hostname and chain are then beside the
point: the pin is the trust); otherwise the certificate is verified against a CA file, or the
system's trust store. A pin mismatch fails the TLS handshake itself, so nothing (not the token
in the upgrade request) is sent to a server that is not the pinned one.

Fingerprints are written ``sha256:<64 lowercase hex digits>``; :func:`normalize_fingerprint`
also takes the ``AA:BB:..`` form other tools print.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import secrets
import shutil
import socket
import ssl
from dataclasses import dataclass

from narrative.errors import InvalidInput

from .errors import TlsError

__all__ = [
    "CA_ENV",
    "FINGERPRINT_ENV",
    "FingerprintMismatch",
    "ServerTls",
    "certificate_fingerprint",
    "client_ssl_context",
    "is_loopback_host",
    "normalize_fingerprint",
    "self_signed_certificate",
    "tls_failure",
]

#: Environment variable with the hub certificate's pinned fingerprint (for ``wss://`` URLs).
FINGERPRINT_ENV = "NARRATIVE_HUB_FINGERPRINT"
#: Environment variable with a CA file to verify the hub's certificate against.
CA_ENV = "NARRATIVE_HUB_CA"

_CERT_NAME = "cert.pem"
_KEY_NAME = "key.pem"
_SELF_SIGNED_DAYS = 3650


def normalize_fingerprint(text: str) -> str:
    """``text`` as ``sha256:<hex>``; accepts that form, bare hex, and ``AA:BB:..``.

    Raises:
        InvalidInput: not a SHA-256 fingerprint.
    """
    value = text.strip()
    if value.lower().startswith("sha256:"):
        value = value[len("sha256:") :]
    digits = value.replace(":", "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digits):
        raise InvalidInput(
            f"not a SHA-256 certificate fingerprint: {text!r} (expected sha256:<64 hex digits>)"
        )
    return f"sha256:{digits}"


def certificate_fingerprint(der: bytes) -> str:
    """The ``sha256:<hex>`` fingerprint of a DER-encoded certificate."""
    return f"sha256:{hashlib.sha256(der).hexdigest()}"


def is_loopback_host(host: str) -> bool:
    """Whether listening on ``host`` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# -- clients ------------------------------------------------------------------------------------


class FingerprintMismatch(TlsError, ssl.SSLCertVerificationError):
    """The server's certificate is not the pinned one. Raised inside the TLS handshake, as
    the certificate verification error asyncio expects there."""

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(f"certificate fingerprint is {got}, expected {expected}")
        self.expected = expected
        self.got = got

    def __str__(self) -> str:  # (ssl.SSLError's would show the args tuple)
        return f"certificate fingerprint is {self.got}, expected {self.expected}"


class _PinnedContext(ssl.SSLContext):
    """A client context that accepts exactly one certificate (checked in the handshake)."""

    pinned: str = ""


class _PinnedObject(ssl.SSLObject):
    """asyncio wraps its TLS connections in this (``sslobject_class``): the pin is checked
    as the handshake completes, before the connection carries a byte of application data."""

    def do_handshake(self) -> None:
        super().do_handshake()
        context = self.context
        assert isinstance(context, _PinnedContext)
        der = self.getpeercert(binary_form=True)
        got = certificate_fingerprint(der) if der else "(no certificate)"
        if got != context.pinned:
            raise FingerprintMismatch(context.pinned, got)


def client_ssl_context(
    url: str, *, fingerprint: str | None = None, ca_file: str | None = None
) -> ssl.SSLContext | None:
    """The SSL context to dial ``url`` with; None for ``ws://`` and ``ws+unix://`` URLs
    (no TLS, and a fingerprint or CA given for them is ignored).

    Args:
        url: The hub's (or gateway's) URL.
        fingerprint: The certificate's pinned fingerprint (see :func:`normalize_fingerprint`):
            the only certificate accepted, whatever its names and issuer.
        ca_file: PEM file of the CA(s) to verify the certificate against, when no fingerprint
            is pinned (default: the system's trust store); the hostname is checked too.

    Raises:
        InvalidInput: the fingerprint is malformed or the CA file cannot be read.
    """
    if not url.lower().startswith("wss://"):
        return None
    context: ssl.SSLContext
    if fingerprint:
        pinned = _PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
        pinned.pinned = normalize_fingerprint(fingerprint)
        pinned.check_hostname = False
        pinned.verify_mode = ssl.CERT_NONE  # the pin, checked in the handshake, is the trust
        pinned.sslobject_class = _PinnedObject
        context = pinned
    else:
        try:
            context = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInput(f"cannot read CA file {ca_file}: {_reason(exc)}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def tls_failure(url: str, exc: ssl.SSLError) -> TlsError:
    """The error to report for a TLS handshake with ``url`` that failed with ``exc``."""
    if isinstance(exc, FingerprintMismatch):
        return TlsError(f"{url}: {exc} (refusing to connect)")
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = getattr(exc, "verify_message", None) or _reason(exc)
        return TlsError(
            f"{url}: cannot verify the server's certificate: {why} (give --ca-file, or pin "
            "its fingerprint with --fingerprint)"
        )
    return TlsError(f"{url}: TLS handshake failed: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


# -- servers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate, loaded: the context to serve ``wss://`` with, and the
    fingerprint clients pin."""

    context: ssl.SSLContext
    fingerprint: str
    cert_file: str

    @classmethod
    def load(cls, cert_file: str, key_file: str) -> ServerTls:
        """Load a PEM certificate (chain) and its key.

        Raises:
            InvalidInput: either file is missing or unreadable, not PEM, or they do not match.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(cert_file, key_file)
            with open(cert_file, encoding="ascii", errors="replace") as f:
                der = ssl.PEM_cert_to_DER_cert(_first_pem_certificate(f.read()))
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise InvalidInput(
                f"cannot load TLS certificate {cert_file} with key {key_file}: {_reason(exc)}"
            ) from None
        return cls(context, certificate_fingerprint(der), cert_file)


def _first_pem_certificate(text: str) -> str:
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        raise ValueError("no PEM certificate in the file")
    return text[start : stop + len(end)] + "\n"


def self_signed_certificate(directory: str, hosts: list[str]) -> tuple[str, str]:
    """The certificate and key files of a self-signed certificate kept in ``directory``,
    made (for ``hosts``, loopback names included) the first time and reused after that, so
    the fingerprint clients pinned stays valid across restarts. The key is mode 0600.

    Raises:
        InvalidInput: the key kept there is readable by others.
    """
    cert_file = os.path.join(directory, _CERT_NAME)
    key_file = os.path.join(directory, _KEY_NAME)
    if not os.path.exists(key_file):
        _make_self_signed(directory, hosts)
    mode = os.stat(key_file).st_mode & 0o777
    if mode & 0o077:
        raise InvalidInput(
            f"TLS key {key_file} is accessible to others (mode {mode:04o}); chmod 600 it"
        )
    return cert_file, key_file


def _make_self_signed(directory: str, hosts: list[str]) -> None:
    # Written in full into a fresh directory renamed into place: the pair is never seen half
    # written, and of two servers racing the first rename wins and both use its certificate.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    # a wildcard address (0.0.0.0, ::) is reached by the machine's name
    wildcard = [socket.gethostname()] if any(h in ("0.0.0.0", "::", "") for h in hosts) else []
    for host in dict.fromkeys([*hosts, *wildcard, "localhost", "127.0.0.1", "::1"]):
        if host in ("0.0.0.0", "::", ""):
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "narrative hub")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=_SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    parent = os.path.dirname(directory.rstrip(os.sep)) or "."
    os.makedirs(parent, mode=0o700, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(directory)}.{secrets.token_hex(6)}.tmp")
    os.mkdir(staging, 0o700)
    try:
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_private(os.path.join(staging, _KEY_NAME), key_pem)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        _write_private(os.path.join(staging, _CERT_NAME), cert_pem)
        try:
            os.rename(staging, directory)
        except OSError:
            if not os.path.exists(os.path.join(directory, _KEY_NAME)):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
