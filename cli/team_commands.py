"""``narrative hub``: share a hub with a team.

On the hub's machine (with the hub store): ``invite``, ``users``, ``revoke``, ``audit``. On a
developer's machine: ``login`` and ``logout``.
"""

from __future__ import annotations

import click

from .context import open_store
from .output import emit, emit_list, json_option, note, table

__all__ = ["COMMANDS"]


@click.group()
def hub() -> None:
    """Share a hub: invite users, log in to a hub, revoke, audit; open its web view."""


@hub.command("invite")
@click.argument("user")
@click.option("--role", type=click.Choice(["member", "admin"]), default="member", show_default=True)
@click.option(
    "--ttl",
    type=click.FloatRange(1.0),
    default=600.0,
    show_default=True,
    help="Seconds the code is good for.",
)
@json_option
@click.pass_context
def invite(ctx: click.Context, user: str, role: str, ttl: float, as_json: bool) -> None:
    """Print a one-time code that lets USER log in to this store's hub (`narrative hub login`).

    The code is good once, for --ttl seconds; a member sees and controls only their own runs,
    an admin every user's.
    """
    from gateway.hub.users import OWNER, AuditLog, UserRegistry

    store = open_store(ctx)
    code = UserRegistry(store).invite(user, role, ttl)
    AuditLog(store).record(OWNER, "invite", user, "ok")
    data = {"user": user, "role": role, "code": code, "expiresIn": ttl}
    emit(as_json, "hub_invite", data, code)


@hub.command("ui")
@json_option
@click.pass_context
def ui(ctx: click.Context, as_json: bool) -> None:
    """Print a one-time URL that logs a browser in to the web view of this store's serving
    hub (`narrative serve`); the login lasts 12 hours in that browser."""
    import asyncio

    from gateway.hub.web import web_login_url

    url = asyncio.run(web_login_url(open_store(ctx)))
    emit(as_json, "hub_ui", {"url": url}, url)


@hub.command("login")
@click.argument("url")
@click.argument("code")
@click.option("--name", help="Name of this login (default: default).")
@click.option(
    "--fingerprint",
    help="Pin the hub's certificate (sha256:HEX, as narrative serve printed it; check it with "
    "the hub's admin); without it a wss:// hub's certificate is checked against the system's CAs.",
)
@json_option
def login_command(
    url: str, code: str, name: str | None, fingerprint: str | None, as_json: bool
) -> None:
    """Log in to the hub at URL with an invite CODE; the credential it answers is kept in your
    config directory (mode 0600)."""
    import asyncio

    from gateway.hub.team_client import login

    record = asyncio.run(login(url, code, name, fingerprint))
    data = {"name": record.name, "url": record.url, "user": record.user, "role": record.role}
    emit(as_json, "hub_login", data, f"logged in to {record.url} as {record.user} ({record.name})")


@hub.command("logout")
@click.argument("name", required=False)
@json_option
def logout_command(name: str | None, as_json: bool) -> None:
    """Forget the login NAME (the only one, if not given) and void its credential at the hub."""
    import asyncio

    from gateway.hub.team_client import logout

    record, problem = asyncio.run(logout(name))
    if problem is not None:
        note(f"narrative: warning: the hub was not told ({problem}); the login was deleted")
    data = {"name": record.name, "url": record.url, "user": record.user, "revoked": not problem}
    emit(as_json, "hub_logout", data, f"logged out of {record.url} ({record.name})")


@hub.command("users")
@json_option
@click.pass_context
def users(ctx: click.Context, as_json: bool) -> None:
    """List the users of this store's hub: name, role, created, last seen, revoked."""
    from gateway.hub.users import UserRegistry

    items = UserRegistry(open_store(ctx)).users()
    columns = ["name", "role", "created", "lastSeen", "revoked"]
    emit_list(as_json, "hub_user_list", items, lambda: table(items, columns))


@hub.command("revoke")
@click.argument("user")
@json_option
@click.pass_context
def revoke(ctx: click.Context, user: str, as_json: bool) -> None:
    """Revoke USER: every credential of theirs is void and their open connections close."""
    import asyncio

    from gateway.hub.client import revoke_user_on_hub

    closed = asyncio.run(revoke_user_on_hub(open_store(ctx), user))
    data = {"user": user, "closed": closed}
    emit(as_json, "hub_revoke", data, f"revoked {user} ({closed} connection(s) closed)")


@hub.command("audit")
@json_option
@click.pass_context
def audit(ctx: click.Context, as_json: bool) -> None:
    """Show the hub's audit log: every control action, who, on what, and the outcome."""
    from gateway.hub.users import AuditLog

    items = AuditLog(open_store(ctx)).entries()
    columns = ["time", "user", "action", "target", "outcome"]
    emit_list(as_json, "hub_audit_entry_list", items, lambda: table(items, columns))


COMMANDS = [hub]
