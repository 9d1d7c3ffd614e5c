"""Transfer commands: export and import artifacts over any fsspec URL."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click

from .context import open_store
from .output import emit, emit_list, json_option, note

__all__ = ["COMMANDS"]


def _storage_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    from transfer.storage_options import (
        merge_storage_options,
        parse_storage_options,
        storage_options_from_env,
    )

    return merge_storage_options(storage_options_from_env(), parse_storage_options(pairs))


_storage_option = click.option(
    "--storage-option",
    "storage_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec storage option, repeatable. Dotted keys nest and values may be JSON: "
    "client_kwargs.endpoint_url=http://127.0.0.1:9000 (MinIO, moto), anon=true. The same "
    "from variables: NARRATIVE_STORAGE_CLIENT_KWARGS__ENDPOINT_URL=... (__ nests). Keep "
    "credentials in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile, not here.",
)


def _remote_row(remote: Any) -> dict[str, Any]:
    """A remote for output: its options flattened, credentials shown as ***."""
    from transfer.storage_options import flat_storage_options

    return {
        "name": remote.name,
        "url": remote.url,
        "storage_options": flat_storage_options(remote.storage_options),
    }


@click.command("export")
@click.argument("url")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["bundle", "tar.gz", "tar.zst"]),
    default="bundle",
    show_default=True,
)
@click.option("--thread", "threads", multiple=True, help="Thread to export (repeatable).")
@click.option("--objective", help="Export every thread of this objective.")
@click.option("--snapshot", help="Export up to this snapshot (archives: this snapshot).")
@click.option("--since", help="Incremental bundle: only what came after this snapshot.")
@_storage_option
@json_option
@click.pass_context
def export_cmd(
    ctx: click.Context,
    url: str,
    fmt: str,
    threads: tuple[str, ...],
    objective: str | None,
    snapshot: str | None,
    since: str | None,
    storage_pairs: tuple[str, ...],
    as_json: bool,
) -> None:
    """Write threads as a git bundle, or one snapshot as an archive, to URL."""
    from transfer.exporter import export

    store = open_store(ctx)
    result = export(
        store,
        url,
        fmt=fmt,
        threads=list(threads) or None,
        objective=objective,
        snapshot=snapshot,
        since=since,
        storage_options=_storage_options(storage_pairs),
    )
    if result.nothing_new:
        note(f"nothing new since {since}: no bundle written")
    emit(
        as_json,
        "export",
        asdict(result),
        lambda: (
            "nothing new"
            if result.nothing_new
            else f"exported {result.objects} {'objects' if fmt == 'bundle' else 'files'} to {url} "
            f"({result.size} bytes, sha256 {result.sha256})"
        ),
    )


@click.command("import")
@click.argument("url")
@_storage_option
@json_option
@click.pass_context
def import_cmd(ctx: click.Context, url: str, storage_pairs: tuple[str, ...], as_json: bool) -> None:
    """Import a bundle or archive from URL (verified before anything changes)."""
    from transfer.importer import import_

    store = open_store(ctx)
    result = import_(store, url, storage_options=_storage_options(storage_pairs))
    for thread_id, ref in result.diverged.items():
        note(
            f"thread {thread_id} moved on both sides: the local head is kept, the incoming one "
            f"is at {ref}"
        )
    for conflict in result.conflicts:
        note(conflict)

    def human() -> str:
        return (
            f"imported {result.objects} objects from {url}: {len(result.updated)} threads "
            f"updated, {len(result.unchanged)} unchanged, {len(result.diverged)} diverged, "
            f"{result.records} records"
        )

    emit(as_json, "import", asdict(result), human)


@click.group()
def remote() -> None:
    """Manage remotes: fsspec directories of bundles shared by several stores."""


@remote.command("add")
@click.argument("name")
@click.argument("url")
@_storage_option
@json_option
@click.pass_context
def remote_add(
    ctx: click.Context, name: str, url: str, storage_pairs: tuple[str, ...], as_json: bool
) -> None:
    """Add a remote NAME at URL (a directory, file://, s3://bucket/prefix, memory://...). Its
    --storage-option values are kept with it (in the store, in plain text)."""
    from transfer.remotes import add_remote
    from transfer.storage_options import flat_storage_options, parse_storage_options

    added = add_remote(open_store(ctx), name, url, parse_storage_options(storage_pairs))
    for key, value in flat_storage_options(added.storage_options).items():
        if value == "***":
            note(
                f"warning: storage option {key} is kept in plain text in the store; prefer "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or NARRATIVE_STORAGE_* "
                "variables"
            )
    emit(as_json, "remote", _remote_row(added), f"added remote {added.name} at {added.url}")


@remote.command("list")
@json_option
@click.pass_context
def remote_list(ctx: click.Context, as_json: bool) -> None:
    """List remotes with their storage options (credentials shown as ***)."""
    from transfer.remotes import list_remotes

    rows = [_remote_row(r) for r in list_remotes(open_store(ctx))]

    def human() -> str:
        return "\n".join(
            "  ".join([r["name"], r["url"], *(f"{k}={v}" for k, v in r["storage_options"].items())])
            for r in rows
        )

    emit_list(as_json, "remote_list", rows, human)


@remote.command("remove")
@click.argument("name")
@json_option
@click.pass_context
def remote_remove(ctx: click.Context, name: str, as_json: bool) -> None:
    """Remove a remote and its remote-tracking refs (nothing on the remote is deleted)."""
    from transfer.remotes import remove_remote

    remove_remote(open_store(ctx), name)
    emit(as_json, "remote_removed", {"removed": name}, f"removed remote {name}")


@click.command()
@click.argument("name")
@click.option("--thread", "threads", multiple=True, help="Thread to push (repeatable).")
@_storage_option
@json_option
@click.pass_context
def push(
    ctx: click.Context,
    name: str,
    threads: tuple[str, ...],
    storage_pairs: tuple[str, ...],
    as_json: bool,
) -> None:
    """Send what remote NAME lacks (one incremental bundle)."""
    from transfer.remotes import push as push_threads

    result = push_threads(
        open_store(ctx), name, list(threads) or None, _storage_options(storage_pairs)
    )
    emit(
        as_json,
        "push",
        asdict(result),
        lambda: (
            f"pushed {len(result.pushed)} threads to {name} ({result.size} bytes)"
            if result.pushed
            else f"{name} is up to date"
        ),
    )


def _fetch(
    ctx: click.Context, name: str, storage_pairs: tuple[str, ...], as_json: bool, move: bool
) -> None:
    from transfer.remotes import fetch as fetch_remote

    results = fetch_remote(
        open_store(ctx), name, move_threads=move, storage_options=_storage_options(storage_pairs)
    )
    for result in results:
        for thread_id, ref in result.diverged.items():
            note(
                f"thread {thread_id} moved on both sides: the local head is kept, the "
                f"incoming one is at {ref}"
            )
    data = [asdict(r) for r in results]
    emit_list(as_json, "import_list", data, f"imported {len(results)} bundles from {name}")


@click.command()
@click.argument("name")
@_storage_option
@json_option
@click.pass_context
def fetch(ctx: click.Context, name: str, storage_pairs: tuple[str, ...], as_json: bool) -> None:
    """Import what remote NAME has and this store lacks; local threads stay put."""
    _fetch(ctx, name, storage_pairs, as_json, move=False)


@click.command()
@click.argument("name")
@_storage_option
@json_option
@click.pass_context
def pull(ctx: click.Context, name: str, storage_pairs: tuple[str, ...], as_json: bool) -> None:
    """Fetch from remote NAME, fast-forward local threads, and merge the workspace's thread
    when it moved on both sides (exit 1 on conflicts, with the merge left in progress: resolve,
    then 'narrative merge --continue'). Other threads that moved on both sides are listed as
    pending merges by 'narrative info'."""
    from transfer.remotes import pull as pull_remote

    result = pull_remote(open_store(ctx), name, storage_options=_storage_options(storage_pairs))
    for thread_id in result.pending:
        note(
            f"thread {thread_id} moved on both sides: pending merge "
            f"('narrative restore {thread_id}' merges {name}/{thread_id} into it)"
        )
    merge = result.merge
    data = {
        "imports": [asdict(r) for r in result.imports],
        "merge": merge.to_dict() if merge is not None else None,
        "pending": result.pending,
        "updated_workspace": result.updated_workspace,
    }
    human = f"imported {len(result.imports)} bundles from {name}"
    if merge is not None:
        human += (
            f"; merged {name}'s work into the workspace (snapshot {merge.snapshot})"
            if not merge.conflicts
            else f"; merge stopped with {len(merge.conflicts)} conflict(s): "
            + ", ".join(c.path for c in merge.conflicts)
            + " (resolve, then 'narrative merge --continue')"
        )
    emit(as_json, "pull", data, human)
    if merge is not None and merge.conflicts:
        ctx.exit(1)


COMMANDS = [export_cmd, import_cmd, remote, push, fetch, pull]
