"""How ``narrative --help`` presents the commands: grouped by concept, each command's help
ending with an example (a test checks every command has one)."""

from __future__ import annotations

import click

__all__ = ["EXAMPLES", "SECTIONS", "add_example", "format_sections"]

#: ``narrative --help`` lists the top-level commands under these headings, in this order.
SECTIONS: dict[str, tuple[str, ...]] = {
    "Snapshots": ("init", "info", "status", "snapshot", "watch", "restore", "config", "gc", "fsck"),
    "History": ("log", "show", "diff", "merge", "objective", "thread"),
    "Transfer": ("export", "import", "remote", "push", "fetch", "pull"),
    "Environments and runs": ("env", "run", "serve", "runtime", "hub"),
    "Gateway": ("gateway",),
}

#: One example per command, by its path below ``narrative``.
EXAMPLES: dict[str, str] = {
    "init": "narrative init",
    "info": "narrative info --json",
    "status": "narrative status",
    "snapshot": "narrative snapshot -m 'before the refactor'",
    "watch": "narrative watch --background   # snapshots then list only what changed",
    "restore": "narrative restore main        # or a snapshot id, origin/main, a run id",
    "config": "narrative config max_file_size 100M",
    "gc": "narrative gc --keep-within 30d --dry-run",
    "fsck": "narrative fsck",
    "log": "narrative log origin/main -n 5",
    "show": "narrative show main",
    "diff": "narrative diff main             # the live workspace against main's head",
    "merge": "narrative merge run-01j...      # a run's result, three-way",
    "objective create": "narrative objective create 'fix the flaky tests'",
    "objective list": "narrative objective list --json",
    "objective show": "narrative objective show obj-01j...",
    "objective set-status": "narrative objective set-status obj-01j... done",
    "thread create": "narrative thread create experiment --from main",
    "thread list": "narrative thread list",
    "thread show": "narrative thread show main",
    "thread reset": "narrative thread reset main main@{1}   # back to the previous head",
    "export": "narrative export /tmp/work.bundle --thread main",
    "import": "narrative import /tmp/work.bundle",
    "remote add": "narrative remote add origin s3://bucket/team --storage-option "
    "client_kwargs.endpoint_url=http://127.0.0.1:9000",
    "remote list": "narrative remote list --json",
    "remote remove": "narrative remote remove origin",
    "push": "narrative push origin",
    "fetch": "narrative fetch origin",
    "pull": "narrative pull origin",
    "env create": "narrative env create box --provider docker   # the default image",
    "env list": "narrative env list --all",
    "env show": "narrative env show box",
    "env start": "narrative env start box",
    "env stop": "narrative env stop box",
    "env restart": "narrative env restart box",
    "env delete": "narrative env delete box",
    "env exec": "narrative env exec box -- ls -la",
    "env logs": "narrative env logs box --tail 50",
    "env health": "narrative env health",
    "env image build": "narrative env image build",
    "env watch": "narrative env watch --interval 10 --count 3",
    "env sweep": "narrative env sweep",
    "run start": "narrative run start --env box -- python agent.py",
    "run finish": "narrative run finish run-01j... --exit-code 0",
    "run list": "narrative run list",
    "run show": "narrative run show run-01j...",
    "run stop": "narrative run stop run-01j... --grace 10",
    "run kill": "narrative run kill run-01j...",
    "serve": "narrative serve --port 3100",
    "hub invite": "narrative hub invite alice --role member --ttl 600",
    "hub login": "narrative hub login wss://hub.example:3100 ninv_... --name team",
    "hub logout": "narrative hub logout team",
    "hub users": "narrative hub users",
    "hub revoke": "narrative hub revoke alice",
    "hub audit": "narrative hub audit --json",
    "hub ui": "narrative hub ui",
    "runtime": "narrative runtime --connect ws://127.0.0.1:3100 --workspace .",
    "gateway serve": "narrative gateway serve --root . --port 3100",
    "gateway call": 'narrative gateway call fs readFile --payload \'{"path": "README.md"}\'',
    "gateway routes": "narrative gateway routes fs readFile",
    "gateway token": "narrative gateway token --run run-01j... --env box --ttl 1h",
}


def add_example(command: click.Command, path: str) -> None:
    """End ``command``'s help with its example (and its subcommands', for a group)."""
    if path in EXAMPLES:
        command.epilog = f"\b\nExample:\n  {EXAMPLES[path]}"
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            add_example(sub, f"{path} {name}")


def format_sections(group: click.Group, ctx: click.Context, formatter: click.HelpFormatter) -> None:
    """The commands under :data:`SECTIONS` headings (any command not listed goes last)."""
    listed = {name for names in SECTIONS.values() for name in names}
    others = tuple(sorted(set(group.commands) - listed))
    limit = formatter.width - 6 - max(map(len, group.commands), default=0)
    for title, names in (*SECTIONS.items(), ("Other", others)):
        rows = []
        for name in names:
            command = group.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=limit)))
        if rows:
            with formatter.section(title):
                formatter.write_dl(rows)
