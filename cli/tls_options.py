"""TLS options shared by the commands that serve or dial a hub or gateway.

Servers: ``--tls-cert``/``--tls-key`` (and, for ``narrative serve``, ``--tls-self-signed``);
a server on an address other than loopback needs one of them, or ``--insecure``.
Clients: ``--fingerprint`` (env ``NARRATIVE_HUB_FINGERPRINT``) pins the server's certificate,
``--ca-file`` (env ``NARRATIVE_HUB_CA``) verifies it against a CA; both only for ``wss://``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from narrative.errors import InvalidInput

from .output import note

if TYPE_CHECKING:
    from gateway.tls import ServerTls

__all__ = ["client_trust_options", "server_tls", "server_tls_options"]

# (the names are gateway.tls.FINGERPRINT_ENV / CA_ENV; not imported here: it costs start-up)
_FINGERPRINT_ENV = "NARRATIVE_HUB_FINGERPRINT"
_CA_ENV = "NARRATIVE_HUB_CA"


def client_trust_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--fingerprint`` and ``--ca-file`` (parameters ``fingerprint``, ``ca_file``)."""
    func = click.option(
        "--ca-file",
        "--cafile",
        "ca_file",
        type=click.Path(dir_okay=False),
        envvar=_CA_ENV,
        help=f"CA file to verify a wss:// server's certificate with (default: the system's; "
        f"env {_CA_ENV}).",
    )(func)
    return click.option(
        "--fingerprint",
        envvar=_FINGERPRINT_ENV,
        metavar="sha256:HEX",
        help="Accept only the wss:// server certificate with this SHA-256 fingerprint "
        f"(as `narrative serve` prints it; env {_FINGERPRINT_ENV}).",
    )(func)


def server_tls_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--tls-cert``, ``--tls-key`` and ``--insecure`` (parameters of the same names)."""
    func = click.option(
        "--insecure",
        is_flag=True,
        help="Allow plain ws:// on an address other than loopback (tokens travel unencrypted).",
    )(func)
    func = click.option(
        "--tls-key", type=click.Path(dir_okay=False), help="Key of --tls-cert (PEM)."
    )(func)
    return click.option(
        "--tls-cert",
        type=click.Path(dir_okay=False),
        help="Serve wss:// with this certificate (PEM, chain allowed).",
    )(func)


def server_tls(
    host: str,
    cert: str | None,
    key: str | None,
    insecure: bool,
    self_signed: Callable[[], tuple[str, str]] | None = None,
) -> ServerTls | None:
    """The TLS a server on ``host`` serves with: the given certificate, else the self-signed
    one ``self_signed`` provides (when the user asked for it), else none, which only loopback
    or ``--insecure`` allow.

    Raises:
        click.UsageError: only one of ``cert`` and ``key``, or both and a self-signed one.
        InvalidInput: the certificate cannot be loaded, or plain ``ws://`` off loopback.
    """
    from gateway.tls import ServerTls, is_loopback_host

    if bool(cert) != bool(key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if cert and key:
        if self_signed is not None:
            raise click.UsageError("give --tls-cert/--tls-key or --tls-self-signed, not both")
        return ServerTls.load(cert, key)
    if self_signed is not None:
        return ServerTls.load(*self_signed())
    if not is_loopback_host(host):
        if not insecure:
            raise InvalidInput(
                f"refusing to serve plain ws:// on {host}, which is not loopback: tokens "
                "would cross the network unencrypted; give --tls-cert/--tls-key or "
                "--tls-self-signed (or --insecure to do it anyway)"
            )
        note(f"warning: serving plain ws:// on {host} (--insecure): tokens travel unencrypted")
    return None
