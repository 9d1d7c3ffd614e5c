"""What a merge did, for people: the report ``narrative merge`` prints (and the hub's web view
shows after a merge), conflicts with what was kept, and the files withheld from a run's result."""

from __future__ import annotations

from typing import Any

__all__ = ["merge_summary", "skipped_lines"]

_HINTS = {
    "content": "conflict markers written",
    "add/add": "conflict markers written",
    "binary": "kept ours; theirs stays in {theirs}",
    "modify/delete": "kept ours (modified); theirs deleted it",
    "delete/modify": "kept theirs (modified); ours deleted it",
    "mode": "kept ours' mode",
    "symlink": "kept ours",
    "type": "kept ours",
    "rename/delete": "kept the renamed file",
    "rename/rename": "kept both names",
    "directory/file": "kept ours; theirs' entry is in {theirs}",
}


def _conflict_lines(data: dict[str, Any]) -> list[str]:
    lines = []
    for c in data["conflicts"]:
        hint = _HINTS.get(c["kind"], "kept ours").format(theirs=data["theirs"])
        other = f" (and {c['other']})" if c.get("other") else ""
        lines.append(f"CONFLICT ({c['kind']}): {c['path']}{other}: {hint}")
    return lines


def skipped_lines(skipped: list[dict[str, Any]]) -> list[str]:
    """The secret-looking files withheld from a run's result, for people."""
    lines = [f"skipped (secret-looking, {s['reason']}): {s['path']}" for s in skipped]
    if lines:
        lines.append(
            f"{len(lines)} file(s) withheld from the result (--include-secrets brings them)"
        )
    return lines


def merge_summary(data: dict[str, Any]) -> str:
    """What a merge did, for people (shared by merge and by restore's pending merge)."""
    if data["up_to_date"]:
        lines = [f"already up to date with {data['theirs']}", *skipped_lines(data["skipped"])]
        return "\n".join(lines)
    lines = [
        f"merged {data['source']} ({data['theirs']}) into the workspace: "
        f"{data['written']} written, {data['deleted']} deleted"
    ]
    lines += [
        f"resolved ({c['kind']}) with {data['strategy']}: {c['path']}" for c in data["resolved"]
    ]
    lines += _conflict_lines(data)
    lines += skipped_lines(data["skipped"])
    if data["snapshot"]:
        lines.append(f"recorded merge snapshot {data['snapshot']}")
    elif data["conflicts"]:
        lines.append(
            "fix the conflicts, then 'narrative merge --continue' (or 'narrative merge --abort')"
        )
    else:
        lines.append("not recorded (--no-commit): 'narrative merge --continue' records it")
    return "\n".join(lines)
