"""README.md stays honest: its Python example runs and its CLI reference matches the click tree.

The README (or the file named by ``NARRATIVE_README``) must have

* a ``## Python API`` section holding at least one fenced ```python block; every ```python
  block in the file is executed, each in a fresh namespace and a fresh temporary directory
  (the current directory), so each block creates its own workspace there;
* a ``## CLI reference`` section holding ```console blocks whose ``$ narrative ...`` lines are
  synopses such as ``$ narrative snapshot [-m MSG] [--thread T] [--json]``: the subcommand path
  must exist in ``cli.main.cli`` and every option must be declared by that command, a group on
  its path, or the root group. Other lines of those blocks (sample output) are not checked.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from cli.main import cli as root_cli
from tests.transfer.conftest import s3_endpoint, s3_options  # noqa: F401 - fixtures

README = Path(
    os.environ.get("NARRATIVE_README") or Path(__file__).resolve().parents[2] / "README.md"
)
PYTHON_SECTION = "Python API"
CLI_SECTION = "CLI reference"
PROMPT = "$ narrative"

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*?)\s*$")
_HEADING = re.compile(r"^ {0,3}(?P<level>#{1,6})\s+(?P<title>.*?)\s*#*\s*$")
_SHORT_OPT = re.compile(r"^-[A-Za-z0-9?]")
_PLACEHOLDER = re.compile(r"^(<.*>|[A-Z][A-Z0-9_-]*)$")


@dataclass(frozen=True)
class Block:
    lang: str
    section: str  # title of the enclosing level-1/2 heading ("" before the first one)
    line: int  # 1-based README line of the first content line
    text: str


def parse_blocks(text: str) -> list[Block]:
    """Every fenced code block with its language tag and enclosing ``#``/``##`` section."""
    blocks: list[Block] = []
    section = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence is None:
            heading = _HEADING.match(line)
            if heading and len(heading["level"]) <= 2:
                section = heading["title"]
            i += 1
            continue
        marker, indent = fence["fence"], len(fence["indent"])
        lang = fence["info"].split()[0].lower() if fence["info"].strip() else ""
        body: list[str] = []
        i += 1
        start = i + 1
        while i < len(lines):
            closing = lines[i].strip()
            if closing and set(closing) == {marker[0]} and len(closing) >= len(marker):
                break
            raw = lines[i]
            strip = len(raw) - len(raw.lstrip(" "))
            body.append(raw[min(indent, strip) :])
            i += 1
        i += 1  # past the closing fence (or the end of the file)
        blocks.append(Block(lang, section, start, "\n".join(body) + "\n"))
    return blocks


def _same(title: str, wanted: str) -> bool:
    return title.strip().casefold() == wanted.casefold()


def cli_lines(blocks: list[Block]) -> list[tuple[int, str]]:
    """``(README line, command line)`` of every ``$ narrative`` line in the CLI reference."""
    out: list[tuple[int, str]] = []
    for block in blocks:
        if block.lang != "console" or not _same(block.section, CLI_SECTION):
            continue
        pending, pending_line = "", 0
        for offset, line in enumerate(block.text.splitlines()):
            if pending:  # a continuation of the previous line
                pending += " " + line.strip()
            elif line.strip() == PROMPT or line.lstrip().startswith(PROMPT + " "):
                pending, pending_line = line.strip(), block.line + offset
            else:
                continue
            if pending.endswith("\\"):
                pending = pending[:-1].rstrip()
                continue
            out.append((pending_line, pending))
            pending = ""
        if pending:
            out.append((pending_line, pending))
    return out


_TEXT = README.read_text(encoding="utf-8") if README.is_file() else ""
_BLOCKS = parse_blocks(_TEXT)
_PYTHON = [b for b in _BLOCKS if b.lang == "python"]
_CLI_LINES = cli_lines(_BLOCKS)


# --- the Python example ----------------------------------------------------------------------


def test_readme_has_python_api_example() -> None:
    assert README.is_file(), f"{README} does not exist"
    sections = {b.section.strip().casefold() for b in _PYTHON}
    assert PYTHON_SECTION.casefold() in sections, (
        f"{README} needs a '## {PYTHON_SECTION}' section with a ```python block "
        f"(python blocks found in: {sorted(sections) or 'none'})"
    )


@pytest.mark.parametrize("block", _PYTHON, ids=[f"line{b.line}" for b in _PYTHON])
def test_readme_python_block_runs(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # Pad with blank lines so tracebacks name the README and its real line numbers.
    code = compile("\n" * (block.line - 1) + block.text, str(README), "exec")
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


# --- the CLI reference -----------------------------------------------------------------------


def test_readme_has_cli_reference() -> None:
    assert README.is_file(), f"{README} does not exist"
    assert any(_same(b.section, CLI_SECTION) and b.lang == "console" for b in _BLOCKS), (
        f"{README} needs a '## {CLI_SECTION}' section with a ```console block"
    )
    assert _CLI_LINES, f"the '## {CLI_SECTION}' console blocks have no '{PROMPT} ...' lines"


def _tokens(line: str) -> list[str]:
    """Words after ``narrative``, with synopsis punctuation (``[ ] { } | ...``) removed."""
    words = shlex.split(line, comments=True)
    assert words[:2] == ["$", "narrative"], words
    out: list[str] = []
    for word in words[2:]:
        if any(c.isspace() for c in word):
            out.append("<value>")  # a quoted argument, never an option or a subcommand
        else:
            out.extend(re.sub(r"\.\.\.|[\[\]{}|]", " ", word).split())
    return out


def _options(command: click.Command, ctx: click.Context) -> dict[str, click.Parameter]:
    """Every option string of ``command`` (help option included) mapped to its parameter."""
    found: dict[str, click.Parameter] = {}
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            for opt in (*param.opts, *param.secondary_opts):
                found[opt] = param
    return found


def _takes_value(param: click.Parameter) -> bool:
    return not (isinstance(param, click.Option) and (param.is_flag or param.count))


def check_cli_line(line: str) -> list[str]:
    """Problems of one ``$ narrative ...`` synopsis against the click tree (empty: none)."""
    try:
        tokens = _tokens(line)
    except ValueError as exc:
        return [f"cannot split: {exc}"]
    ctx = click.Context(root_cli, info_name="narrative")
    command: click.Command = root_cli
    known = _options(root_cli, ctx)  # options of the root, the groups on the path, the command
    path = ["narrative"]
    rest: list[str] = []
    # Walk the groups: options before a subcommand belong to the group (skip their values).
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not isinstance(command, click.Group):
            rest = tokens[i:]
            break
        if token == "--" or _PLACEHOLDER.match(token):
            rest = tokens[i:]  # e.g. "COMMAND [ARGS]..." in a generic usage line
            break
        if token.startswith("-"):
            rest.append(token)
            param = known.get(token.split("=", 1)[0])
            if param is not None and _takes_value(param) and "=" not in token:
                i += param.nargs if param.nargs > 0 else 1
            i += 1
            continue
        sub = command.commands.get(token)
        if sub is None:
            return [
                f"'{' '.join(path)} {token}' is not a command "
                f"(choices: {', '.join(sorted(command.commands))})"
            ]
        ctx = click.Context(sub, parent=ctx, info_name=token)
        command = sub
        path.append(token)
        known.update(_options(command, ctx))
        i += 1
    problems: list[str] = []
    for token in rest:
        if token == "--":
            break
        if token.startswith("--"):
            name = token.split("=", 1)[0]
            if name not in known:
                problems.append(f"'{' '.join(path)}' has no option {name}")
        elif _SHORT_OPT.match(token) and not token[1:].isdigit():
            # click semantics: "-vq" is two flags, "-mMSG" is -m with a value
            for char in token[1:]:
                param = known.get(f"-{char}")
                if param is None:
                    problems.append(f"'{' '.join(path)}' has no option -{char}")
                    break
                if _takes_value(param):
                    break
    return problems


@pytest.mark.parametrize(
    "line", [text for _, text in _CLI_LINES], ids=[f"line{n}" for n, _ in _CLI_LINES]
)
def test_readme_cli_reference_line(line: str) -> None:
    problems = check_cli_line(line)
    assert not problems, f"{README}: {line!r}: " + "; ".join(problems)


# --- walkthroughs: console sessions that run exactly as written ----------------------------------

#: Level-2 sections whose ```console blocks are shell sessions run as written, one bash script
#: per section (blocks in order), in a fresh directory with the package's ``narrative`` on PATH.
#: A command line ending in ``# fails`` must exit non-zero; lines without ``$ `` are sample output.
WALKTHROUGHS = (
    "Two machines",
    "Hybrid environments",
    "Share a hub",
    "Another hub as an environment",
)


def walkthrough_script(blocks: list[Block], section: str) -> str:
    """The bash script a walkthrough section's console blocks make."""
    lines = ["set -euo pipefail"]
    for block in blocks:
        if block.lang != "console" or not _same(block.section, section):
            continue
        pending = ""
        for raw in block.text.splitlines():
            if pending:
                pending += "\n" + raw
            elif raw.startswith("$ "):
                pending = raw[2:]
            else:
                continue
            if pending.endswith("\\"):
                continue
            command, expect_failure = pending, False
            if re.search(r"#\s*fails\b[^\n]*$", command):
                command, expect_failure = command[: command.rindex("#")].rstrip(), True
            lines.append(f"if {command}; then exit 97; fi" if expect_failure else command)
            pending = ""
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("section", WALKTHROUGHS)
def test_readme_walkthrough_runs_as_written(section: str, tmp_path: Path) -> None:
    run_walkthrough(section, tmp_path, {})


def test_readme_s3_walkthrough_runs_against_moto(
    s3_endpoint: str,  # noqa: F811 - the imported fixture
    s3_options: dict[str, object],  # noqa: F811
    tmp_path: Path,
) -> None:
    """'## S3 and MinIO', with moto as the endpoint (s3_options sets the AWS variables and
    creates the bucket)."""
    from tests.transfer.conftest import BUCKET

    run_walkthrough("S3 and MinIO", tmp_path, {"S3_ENDPOINT": s3_endpoint, "S3_BUCKET": BUCKET})


def test_readme_docker_walkthrough_runs_on_the_engine(tmp_path: Path) -> None:
    """'## Agents in Docker' on the private engine (skipped without one unless
    NARRATIVE_REQUIRE_DOCKER=1): the default image is built offline on first use."""
    from tests.providers.docker_support import connect

    connect().close()
    run_walkthrough("Agents in Docker", tmp_path, {})


def run_walkthrough(section: str, tmp_path: Path, extra_env: dict[str, str]) -> None:
    import subprocess
    import sys

    script = walkthrough_script(_BLOCKS, section)
    assert script.count("\n") > 2, f"{README} has no console blocks in '## {section}'"
    env = {
        **os.environ,
        **extra_env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    proc = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, (
        f"'## {section}' of {README} failed (exit {proc.returncode}; 97: a '# fails' line "
        f"succeeded):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


def test_walkthrough_script_follows_the_session() -> None:
    text = (
        "## Two machines\n\n```console\n$ mkdir a\nsome output\n$ cd a && \\\n  true\n"
        "$ narrative push origin   # fails: pull first\n```\n"
    )
    assert walkthrough_script(parse_blocks(text), "Two machines") == (
        "set -euo pipefail\nmkdir a\ncd a && \\\n  true\n"
        "if narrative push origin; then exit 97; fi\n"
    )


# --- the checker itself, so a lenient checker cannot pass a drifted README --------------------


@pytest.mark.parametrize(
    "line",
    [
        "$ narrative snapshot [-m MSG] [--thread T] [--run R] [--allow-empty] [--json]",
        "$ narrative run start [--thread T] [--agent NAME] [--json]",
        "$ narrative objective create TITLE [-d|--description TEXT] [--json]",
        "$ narrative [-C DIR] [--store DIR] [-v|-q] COMMAND [ARGS]...",
        "$ narrative -C some/dir --store=x -vv log -n5 --all  # a comment",
        "$ narrative --version",
        "$ narrative run finish RUN_ID --exit-code -1 --status=failed",
        '$ narrative snapshot -m "a message with [brackets] --and text"',
    ],
)
def test_checker_accepts_valid_lines(line: str) -> None:
    assert check_cli_line(line) == []


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("$ narrative snapshots [--json]", "'narrative snapshots' is not a command"),
        ("$ narrative run begin", "'narrative run begin' is not a command"),
        ("$ narrative snapshot [--threads T]", "has no option --threads"),
        ("$ narrative run start [--thread T|--objective O]", "has no option --objective"),
        ("$ narrative log [-x]", "has no option -x"),
        ("$ narrative --nope snapshot", "has no option --nope"),
    ],
)
def test_checker_rejects_drift(line: str, problem: str) -> None:
    assert any(problem in p for p in check_cli_line(line)), check_cli_line(line)


def test_parser_finds_sections_and_ignores_headings_in_code() -> None:
    text = (
        "# title\n\n## Python API\n\n```python\n# not a heading\nx = 1\n```\n\n"
        "## CLI reference\n\n```console\n$ narrative snapshot [--json]\nsome output\n"
        "$ narrative log \\\n    --all\n```\n\n## Later\n\n```console\n$ narrative nope\n```\n"
    )
    blocks = parse_blocks(text)
    assert [(b.lang, b.section, b.line) for b in blocks] == [
        ("python", "Python API", 6),
        ("console", "CLI reference", 13),
        ("console", "Later", 22),
    ]
    assert blocks[0].text == "# not a heading\nx = 1\n"
    assert cli_lines(blocks) == [
        (13, "$ narrative snapshot [--json]"),
        (15, "$ narrative log --all"),
    ]
