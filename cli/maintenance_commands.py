"""Looking after a store: its settings (config), dropping old snapshots (gc), checking it
(fsck)."""

from __future__ import annotations

import click

from narrative.errors import InvalidInput

from .context import open_store
from .output import emit, json_option

__all__ = ["COMMANDS"]


@click.command()
@click.option("--keep-last", type=click.IntRange(min=1), help="Keep the newest N per thread.")
@click.option("--keep-within", help="Keep snapshots younger than this (e.g. 7d, 12h, 30m).")
@click.option("--dry-run", is_flag=True, help="Only report what would be dropped.")
@json_option
@click.pass_context
def gc(
    ctx: click.Context, keep_last: int | None, keep_within: str | None, dry_run: bool, as_json: bool
) -> None:
    """Drop old snapshots by a retention policy and pack the store."""
    from dataclasses import asdict

    from narrative.gc import RetentionPolicy, collect_garbage, parse_duration

    policy = RetentionPolicy(keep_last, parse_duration(keep_within) if keep_within else None)
    report = collect_garbage(open_store(ctx), policy, dry_run=dry_run)
    emit(
        as_json,
        "gc_report",
        asdict(report),
        f"{'would drop' if dry_run else 'dropped'} {len(report.dropped)} snapshots; "
        f"{report.packs_before} packs -> {report.packs_after}; "
        f"{report.bytes_before} -> {report.bytes_after} bytes",
    )


@click.command()
@json_option
@click.pass_context
def fsck(ctx: click.Context, as_json: bool) -> None:
    """Check the store: refs, connectivity, every object (as git fsck --strict), records."""
    from narrative.fsck import check_store

    problems = check_store(open_store(ctx))
    emit(
        as_json,
        "fsck_report",
        {"ok": not problems, "problems": problems},
        "\n".join(problems) if problems else "store is consistent",
    )
    if problems:
        ctx.exit(1)


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _parse_size(text: str) -> int:
    import re

    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise InvalidInput(f"invalid size {text!r} (examples: 50M, 1G, 4096)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


@click.command()
@click.argument(
    "key",
    required=False,
    type=click.Choice(["max_file_size", "max_import_size", "manual_run_timeout", "default_thread"]),
)
@click.argument("value", required=False)
@json_option
@click.pass_context
def config(ctx: click.Context, key: str | None, value: str | None, as_json: bool) -> None:
    """Show the store's settings, or set KEY to VALUE (sizes like 100M, durations like 12h, a
    thread name or id)."""
    store = open_store(ctx)
    if key is not None and value is not None:
        if key == "max_file_size":
            store.config.max_file_size = _parse_size(value)
        elif key == "max_import_size":
            store.config.max_import_size = _parse_size(value)
        elif key == "manual_run_timeout":
            from narrative.gc import parse_duration

            store.config.manual_run_timeout = parse_duration(value)
        else:
            from narrative.hierarchy import resolve_thread

            store.config.default_thread = resolve_thread(store, value).id
        store.save_config()
    data = {k: v for k, v in store.config.to_dict().items() if k != "version"}
    if key is not None:
        data = {key: data[key]}
    emit(as_json, "config", data, lambda: "\n".join(f"{k} = {v}" for k, v in data.items()))


COMMANDS = [config, gc, fsck]
