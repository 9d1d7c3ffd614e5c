"""What the web view's pages show, read from the store with the library functions the CLI uses
(``run list``, ``run show``, ``diff``, ``log``, ``env list``/``logs``): plain data for the
templates, no HTML here. Everything is called on the hub's store thread."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from narrative.commits import read_commit, thread_snapshots
from narrative.diff import diff_snapshots
from narrative.errors import NarrativeError
from narrative.hierarchy import list_objectives, list_runs, list_threads
from narrative.models import AgentRun
from narrative.runs import run_snapshots, withheld_files
from narrative.shared import REMOTE_REF_PREFIX
from narrative.store import Store
from providers.manager import EnvironmentManager

from ..agent_output import output_bytes
from ..usage_records import load_usage

__all__ = [
    "RUN_STATUSES",
    "FileDiff",
    "RunDiff",
    "RunPage",
    "describe_event",
    "environments",
    "highlight",
    "language_of",
    "mergeable",
    "overview",
    "run_diff",
    "run_seconds",
    "runs_page",
    "topology",
]

RUN_STATUSES = ("running", "succeeded", "failed", "cancelled", "killed")
_SNAPSHOTS_PER_THREAD = 20
_MAX_PAGE = 1000
_MAX_DIFF_FILES = 200
_MAX_FILE_PATCH = 256 << 10


@dataclass
class RunPage:
    """One page of the runs table, newest first."""

    rows: list[dict[str, Any]]
    total: int
    page: int
    per: int
    environments: list[str]

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per))


def _seconds(start: str, end: str | None) -> float | None:
    try:
        begin = datetime.fromisoformat(start).timestamp()
        finish = datetime.fromisoformat(end).timestamp() if end else time.time()
    except ValueError:
        return None
    return max(0.0, finish - begin)


def run_seconds(run: AgentRun) -> float | None:
    """How long ``run`` took (so far, while it runs)."""
    return _seconds(run.started_at, run.finished_at)


def duration_text(seconds: float | None) -> str:
    """``1h 2m``, ``3m 4s``, ``5s`` (empty: unknown)."""
    if seconds is None:
        return ""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def usage_text(usage: dict[str, Any] | None) -> str:
    """What a run used, short: ``1.2 s CPU, 35 MB peak`` (empty: not recorded)."""
    if not usage:
        return ""
    parts = []
    cpu, peak = usage.get("cpu_seconds"), usage.get("peak_memory_bytes")
    if isinstance(cpu, int | float):
        parts.append(f"{cpu:.1f} s CPU")
    if isinstance(peak, int | float):
        parts.append(f"{peak / 1e6:.0f} MB peak")
    return ", ".join(parts)


def run_row(
    store: Store, run: AgentRun, environments: dict[str, tuple[str, str]]
) -> dict[str, Any]:
    """A run as a row of the table (what ``run list --json`` says, plus provider, host,
    duration and what it used)."""
    provider, host = environments.get(run.environment, ("", ""))
    return {
        **run.to_dict(),
        "provider": provider,
        "host": host,
        "duration": duration_text(run_seconds(run)),
        "used": usage_text(load_usage(store, run.id)),
    }


def runs_page(
    store: Store,
    manager: EnvironmentManager,
    *,
    status: str = "",
    environment: str = "",
    text: str = "",
    page: int = 1,
    per: int = 100,
) -> RunPage:
    """Runs matching the filters (status, environment, a substring of id, agent or thread),
    newest first, one page of ``per`` (at most 1,000)."""
    known = {r.name: (r.provider, str(r.config.get("host", ""))) for r in manager.environments()}
    runs = list_runs(store)
    envs = sorted({r.environment for r in runs})
    needle = text.strip().lower()
    chosen = [
        r
        for r in runs
        if (not status or r.status == status)
        and (not environment or r.environment == environment)
        and (not needle or needle in f"{r.id} {r.agent} {r.thread_id}".lower())
    ]
    chosen.sort(key=lambda r: (r.started_at, r.id), reverse=True)
    per = min(max(per, 1), _MAX_PAGE)
    page = max(page, 1)
    shown = chosen[(page - 1) * per : page * per]
    return RunPage([run_row(store, r, known) for r in shown], len(chosen), page, per, envs)


def mergeable(run: AgentRun) -> tuple[bool, str]:
    """Whether the page offers to merge ``run``, and why not (the same rule as ``narrative
    merge``: only a finished, successful run with a result; no --allow-failed from the page)."""
    if run.status == "running":
        return False, "the run is still going"
    if run.status != "succeeded":
        return False, f"the run did not succeed ({run.status}): merge it with the CLI"
    if run.result_snapshot is None:
        return False, "the run has no result snapshot"
    return True, ""


def describe_event(event: dict[str, Any]) -> dict[str, str]:
    """One event of a run's log as the page shows it: time, kind, and a line of text (agent
    output decoded; the page escapes all of it)."""
    kind = str(event.get("type", ""))
    skip = ("seq", "time", "type", "at", "rseq", "data", "data64")
    if kind == "agent.output":
        try:
            text = output_bytes(event).decode("utf-8", "replace")
        except ValueError:
            text = ""
    elif kind == "call.routed":
        route = " → ".join(str(hop) for hop in event.get("route") or [])
        state = "ok" if event.get("success") else f"error {event.get('error')}"
        text = f"{event.get('call')} via {route} ({event.get('ms')} ms, {state})"
    elif kind == "runtime.log":
        text = "\n".join(str(line) for line in event.get("lines") or [])
    else:
        text = " ".join(f"{k}={_scrub(k, v)}" for k, v in event.items() if k not in skip)
    stream = str(event.get("stream", "")) if kind == "agent.output" else ""
    return {
        "seq": str(event.get("seq", "")),
        "time": str(event.get("time", "")),
        "kind": kind,
        "stream": stream,
        "text": text,
    }


_KEYWORDS = {
    "py": "and as assert async await break class continue def del elif else except False "
    "finally for from global if import in is lambda None nonlocal not or pass raise return "
    "True try while with yield",
    "js": "async await break case catch class const continue default delete do else export "
    "extends false finally for function if import in instanceof let new null return super "
    "switch this throw true try typeof undefined var void while yield",
    "go": "break case chan const continue default defer else fallthrough for func go goto if "
    "import interface map nil package range return select struct switch type var",
    "rs": "as async await break const continue crate else enum extern false fn for if impl in "
    "let loop match mod move mut pub ref return self Self static struct super trait true type "
    "unsafe use where while",
    "sh": "case do done elif else esac export fi for function if in local return then until while",
    "c": "auto break case char const continue default do double else enum extern float for goto "
    "if int long register return short signed sizeof static struct switch typedef union "
    "unsigned void volatile while",
}
_LANGUAGES = {
    "py": "py", "pyi": "py", "js": "js", "mjs": "js", "ts": "js", "tsx": "js", "jsx": "js",
    "go": "go", "rs": "rs", "sh": "sh", "bash": "sh", "c": "c", "h": "c", "cc": "c",
    "cpp": "c", "hpp": "c", "java": "c",
}  # fmt: skip
_TOKENS = re.compile(
    r"(?P<str>\"(?:[^\"\\]|\\.)*\"?|'(?:[^'\\]|\\.)*'?)"
    r"|(?P<com>(?:#|//).*)"
    r"|(?P<num>\b\d[\d_.xXa-fA-F]*\b)"
    r"|(?P<word>\b[A-Za-z_]\w*\b)"
)


def language_of(path: str) -> str | None:
    """The highlighting language of a file, by its extension (None: plain)."""
    return _LANGUAGES.get(path.rsplit(".", 1)[-1].lower()) if "." in path else None


def highlight(code: str, language: str | None) -> list[tuple[str, str]]:
    """``code`` (one line) as (token class, text) pieces: strings, comments, numbers and the
    language's keywords get a class, everything else ``""``. Escaping is the template's."""
    if language is None:
        return [("", code)]
    keywords = set(_KEYWORDS[language].split())
    comment = "#" if language in ("py", "sh") else "//"
    pieces: list[tuple[str, str]] = []
    last = 0
    for match in _TOKENS.finditer(code):
        kind = match.lastgroup or ""
        text = match.group()
        if kind == "com" and not text.startswith(comment):
            continue
        if kind == "word":
            if text not in keywords:
                continue
            kind = "kw"
        if match.start() > last:
            pieces.append(("", code[last : match.start()]))
        pieces.append((kind, text))
        last = match.end()
    if last < len(code):
        pieces.append(("", code[last:]))
    return pieces


_SECRET_KEY = re.compile(r"token|secret|password|passwd|credential|key|env", re.IGNORECASE)


def _scrub(key: str, value: Any) -> Any:
    """``value`` with what may be a secret hidden: the values of environment variables passed
    to a run and of any field named like a token, password or key (the names stay)."""
    if isinstance(value, dict):
        if _SECRET_KEY.search(key):
            return {k: "(hidden)" for k in value}
        return {k: _scrub(str(k), v) for k, v in value.items()}
    if isinstance(value, str) and _SECRET_KEY.search(key) and key not in ("environment",):
        return "(hidden)"
    return value


@dataclass
class FileDiff:
    path: str
    status: str
    insertions: int
    deletions: int
    binary: bool
    lines: list[tuple[str, str, list[tuple[str, str]]]] = field(default_factory=list)
    """(css class, sign or header, highlighted pieces) of each line of the unified diff."""
    cut: bool = False


@dataclass
class RunDiff:
    files: list[FileDiff]
    error: str = ""
    skipped: list[dict[str, Any]] = field(default_factory=list)
    more_files: int = 0


def _line_class(line: str) -> str:
    if line.startswith(("+++", "---", "diff --git", "index ", "new file", "deleted file")):
        return "meta"
    if line.startswith("@@"):
        return "hunk"
    if line.startswith("+"):
        return "add"
    if line.startswith("-"):
        return "del"
    return "ctx"


def run_diff(store: Store, run: AgentRun) -> RunDiff:
    """The diff of ``run``'s result against its base (as ``narrative diff RUN --allow-failed``),
    split per file."""
    try:
        base, result = run_snapshots(store, run, allow_failed=True)
    except NarrativeError as exc:
        return RunDiff([], str(exc))
    if base is None:
        return RunDiff([], f"run {run.id} has no base snapshot to diff against")
    found = diff_snapshots(store, base, result, patch=True)
    patches = _split_patch(found.patch or "")
    files = []
    for change in found.files[:_MAX_DIFF_FILES]:
        text = patches.get(change.path, "")
        cut = len(text) > _MAX_FILE_PATCH
        language = language_of(change.path)
        lines = []
        for line in text[:_MAX_FILE_PATCH].splitlines():
            kind = _line_class(line)
            if kind in ("add", "del", "ctx"):
                lines.append((kind, line[:1], highlight(line[1:], language)))
            else:
                lines.append((kind, line, []))
        files.append(
            FileDiff(
                change.path,
                change.status,
                change.insertions,
                change.deletions,
                change.binary,
                lines,
                cut,
            )
        )
    more = max(0, len(found.files) - _MAX_DIFF_FILES)
    return RunDiff(files, skipped=withheld_files(result), more_files=more)


def _split_patch(patch: str) -> dict[str, str]:
    """A whole patch by file. Every file's part starts with a ``diff --git a/P b/P`` line, and
    no line of a file's content can (those start with ``+``, ``-``, space or backslash)."""
    parts: dict[str, list[str]] = {}
    path = ""
    for line in patch.splitlines(keepends=True):
        if line.startswith("diff --git a/"):
            header = line[len("diff --git a/") :].rstrip("\n")
            path = header[: (len(header) - 3) // 2]  # "P b/P": the same path twice
        parts.setdefault(path, []).append(line)
    return {k: "".join(v) for k, v in parts.items()}


def overview(store: Store) -> list[dict[str, Any]]:
    """Objectives, their threads and each thread's newest snapshots (with the remotes whose
    tracking head each is); the objective and thread with the newest activity first."""
    remote_heads: dict[str, list[str]] = {}
    for name, oid in store.refs.list(REMOTE_REF_PREFIX).items():
        remote = name[len(REMOTE_REF_PREFIX) :].partition("/threads/")[0]
        remote_heads.setdefault(oid.hex(), []).append(remote)
    objectives = []
    for objective in list_objectives(store):
        threads = []
        for thread in list_threads(store, objective.id):
            snaps = []
            for snap in thread_snapshots(store, thread.id):
                snaps.append(snap)
                if len(snaps) >= _SNAPSHOTS_PER_THREAD:
                    break
            latest = snaps[0].created_at if snaps else thread.created_at
            threads.append(
                {
                    "thread": thread,
                    "snapshots": snaps,
                    "latest": latest,
                    "remote": {s.id: remote_heads.get(s.commit, []) for s in snaps},
                    "merges": {
                        s.id
                        for s in snaps
                        if len(read_commit(store, bytes.fromhex(s.commit)).parents) > 1
                    },
                }
            )
        threads.sort(key=lambda t: str(t["latest"]), reverse=True)
        newest = str(threads[0]["latest"]) if threads else objective.created_at
        objectives.append({"objective": objective, "threads": threads, "latest": newest})
    objectives.sort(key=lambda o: str(o["latest"]), reverse=True)
    return objectives


def environments(manager: EnvironmentManager, tail: int = 20) -> list[dict[str, Any]]:
    """Every environment with its state, health and the tail of its log."""
    rows = []
    for record in manager.environments():
        rows.append(
            {
                "record": record,
                "health": "failing" if record.consecutive_failures else "ok",
                "log": manager.logs.lines(record.name, tail),
            }
        )
    return rows


def usage_of(store: Store, run_id: str) -> dict[str, Any] | None:
    """What the run used (``run show``'s usage), if recorded."""
    return load_usage(store, run_id)


def topology(hub: str, peers: dict[str, list[str]]) -> dict[str, Any]:
    """Where to draw the hub (centre) and its connected nodes (around it) in a 400x300 box."""
    names = sorted(peers)
    nodes = []
    for i, name in enumerate(names):
        angle = 2 * math.pi * i / max(len(names), 1) - math.pi / 2
        nodes.append(
            {
                "name": name,
                "x": round(200 + 130 * math.cos(angle)),
                "y": round(150 + 110 * math.sin(angle)),
            }
        )
    return {"hub": hub, "x": 200, "y": 150, "nodes": nodes}
