"""The ``merge`` command: three-way merge of a run's result (or a snapshot) into the workspace.

Exit status 1 when conflicts are left in the workspace (as ``git merge`` does), also with
``--json``, whose document then lists them.
"""

from __future__ import annotations

import click

from narrative.errors import InvalidInput
from narrative.merge_report import merge_summary, skipped_lines

from .context import complete_refs, open_store
from .output import emit, json_option, note

__all__ = ["COMMANDS", "merge_summary", "skipped_lines"]


@click.command()
@click.argument("source", metavar="[RUN|SNAPSHOT]", required=False, shell_complete=complete_refs)
@click.option(
    "--strategy",
    type=click.Choice(["ours", "theirs"]),
    help="Settle conflicts in favour of one side (per hunk for text).",
)
@click.option("--no-commit", is_flag=True, help="Apply the merge but do not record a snapshot.")
@click.option("--continue", "cont", is_flag=True, help="Record the resolved merge as a snapshot.")
@click.option("--abort", is_flag=True, help="Return the workspace to the pre-merge snapshot.")
@click.option(
    "--allow-failed", is_flag=True, help="Merge the result of a run that did not succeed."
)
@click.option(
    "--force",
    is_flag=True,
    help="Merge even a result that changes ignore files, proxyExecution.json or narrative.toml"
    " (or, with --allow-failed, deletes most files).",
)
@click.option(
    "--include-secrets",
    is_flag=True,
    help="Bring the secret-looking files withheld from a run's result too.",
)
@json_option
@click.pass_context
def merge(
    ctx: click.Context,
    source: str | None,
    strategy: str | None,
    no_commit: bool,
    cont: bool,
    abort: bool,
    allow_failed: bool,
    force: bool,
    include_secrets: bool,
    as_json: bool,
) -> None:
    """Merge a run's result (or a snapshot) into the workspace, three-way.

    Base is the run's base snapshot (for a snapshot: the merge base with the workspace's
    thread); ours is the workspace, snapshotted first; theirs is the result. Without arguments,
    shows the merge in progress.
    """
    from narrative import workspace_merge as wm

    if cont and abort:
        raise click.UsageError("use either --continue or --abort")
    if (cont or abort) and (source or strategy or no_commit):
        raise click.UsageError("--continue/--abort take no SOURCE, --strategy or --no-commit")
    store = open_store(ctx)
    if abort:
        restored = wm.abort_merge(store)
        note(f"safety snapshot {restored.safety_snapshot} holds the merged state")
        emit(
            as_json,
            "merge_aborted",
            {
                "aborted": True,
                "snapshot": restored.snapshot,
                "safety_snapshot": restored.safety_snapshot,
            },
            f"merge aborted: workspace restored to {restored.snapshot}",
        )
        return
    if cont:
        snap = wm.continue_merge(store)
        emit(as_json, "merge_continued", {"snapshot": snap}, f"recorded merge snapshot {snap}")
        return
    if source is None:
        state = wm.merge_state(store)
        data = state.to_dict() if state is not None else None
        emit(
            as_json,
            "merge_state",
            {"merge": data},
            "no merge in progress"
            if state is None
            else f"merging {state.source} ({state.theirs}), {state.phase}; "
            f"{len(state.conflicts)} conflict(s); pre-merge snapshot {state.pre_merge}",
        )
        return
    if not source.strip():
        raise InvalidInput("empty merge source")
    result = wm.merge_workspace(
        store,
        source,
        strategy="ours" if strategy == "ours" else "theirs" if strategy == "theirs" else None,
        commit=not no_commit,
        allow_failed=allow_failed,
        force=force,
        include_secrets=include_secrets,
    )
    data = result.to_dict()
    if not result.up_to_date:
        note(f"pre-merge snapshot {result.pre_merge}; base {result.base or '(none: two-way)'}")
    emit(as_json, "merge", data, lambda: merge_summary(data))
    if result.conflicts:
        ctx.exit(1)


COMMANDS = [merge]
