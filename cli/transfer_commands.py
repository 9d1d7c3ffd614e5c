"""Transfer commands: export and import artifacts over any fsspec URL."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click

from .context import open_store
from .output import emit, json_option, note
from .progress import progress_callback

__all__ = ["COMMANDS"]


def _storage_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    from transfer.fsio import merge_storage_options, parse_storage_options, storage_options_from_env

    return merge_storage_options(storage_options_from_env(), parse_storage_options(pairs))


_storage_option = click.option(
    "--storage-option",
    "storage_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec storage option (repeatable; also NARRATIVE_STORAGE_* variables).",
)


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
    with progress_callback(ctx, "export", enabled=not as_json) as callback:
        result = export(
            store,
            url,
            fmt=fmt,
            threads=list(threads) or None,
            objective=objective,
            snapshot=snapshot,
            since=since,
            storage_options=_storage_options(storage_pairs),
            callback=callback,
        )
    if result.nothing_new:
        note(f"nothing new since {since}: no bundle written")
    emit(
        as_json,
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
    with progress_callback(ctx, "import", enabled=not as_json) as callback:
        result = import_(
            store, url, storage_options=_storage_options(storage_pairs), callback=callback
        )
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

    emit(as_json, asdict(result), human)


COMMANDS = [export_cmd, import_cmd]
