"""Machine-facing conventions of the CLI (issue 14 item 6): with ``--json`` an error is one
JSON document on stdout (``{"error": {"code", "message"}}``, exit 1; usage errors exit 2), and
the global options work in any position before ``--`` (after it, they belong to the command)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest

from tests.conftest import NARRATIVE, Cli


def test_a_json_error_is_one_document_on_stdout(cli: Cli, workspace: Path) -> None:
    proc = cli.run("show", "snap-doesnotexist", "--json", check=False)
    assert proc.returncode == 1
    assert json.loads(proc.stdout) == {
        "error": {"code": "store_not_found", "message": json.loads(proc.stdout)["error"]["message"]}
    }
    assert proc.stderr == ""
    cli.run("init")
    proc = cli.run("show", "snap-doesnotexist", "--json", check=False)
    error = json.loads(proc.stdout)["error"]
    assert proc.returncode == 1 and error["code"] == "snapshot_not_found", proc
    assert "snap-doesnotexist" in error["message"]


def test_a_usage_error_with_json_exits_2_with_a_document(cli: Cli, workspace: Path) -> None:
    proc = cli.run("log", "--no-such-option", "--json", check=False)
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["error"]["code"] == "usage"
    plain = cli.run("log", "--no-such-option", check=False)
    assert plain.returncode == 2 and "Usage:" in plain.stderr and plain.stdout == ""


def test_without_json_an_error_is_one_line_on_stderr(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    proc = cli.run("show", "snap-doesnotexist", check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("narrative: error: ") and proc.stderr.count("\n") == 1


def test_global_options_after_the_subcommand(cli: Cli, workspace: Path, tmp_path: Path) -> None:
    cli.run("init")
    (workspace / "a.txt").write_text("a\n")
    quiet = cli.run("snapshot", "-m", "one", "-q")
    assert quiet.stderr == ""
    elsewhere = Cli(tmp_path)
    assert elsewhere.items("log", "-C", str(workspace))[0]["message"] == "one"
    assert elsewhere.items("log", "--json", "-C", str(workspace), "-n", "1")[0]["message"] == "one"
    store = cli.json("info")["store"]
    assert elsewhere.items("log", "--store", store)[0]["message"] == "one"
    nested = elsewhere.items("thread", "list", "-C", str(workspace))
    assert len(nested) == 1


def test_options_after_double_dash_belong_to_the_command(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    cli.run("env", "create", "box", "--provider", "worktree")
    proc = cli.run("env", "exec", "box", "--", "echo", "-v", "-q", "--json", "-C", "x")
    assert proc.stdout.strip() == "-v -q --json -C x"


def _commands() -> list[tuple[str, click.Command]]:
    from cli.main import cli as root

    found = []

    def walk(command: click.Command, path: str) -> None:
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, f"{path} {name}".strip())
        else:
            found.append((path, command))

    walk(root, "")
    return found


def test_every_command_has_an_example_and_a_section() -> None:
    from cli.help import EXAMPLES, SECTIONS
    from cli.main import cli as root

    missing = [path for path, _command in _commands() if path not in EXAMPLES]
    assert missing == [], f"commands without an example in cli/help.py: {missing}"
    stale = set(EXAMPLES) - {path for path, _command in _commands()}
    assert stale == set(), f"examples of commands that do not exist: {stale}"
    sectioned = {name for names in SECTIONS.values() for name in names}
    assert set(root.commands) == sectioned


def test_help_is_grouped_and_shows_the_example(cli: Cli) -> None:
    top = cli.run("--help").stdout
    for title in ("Snapshots:", "History:", "Transfer:", "Environments and runs:", "Gateway:"):
        assert title in top
    assert "Other:" not in top
    shown = cli.run("remote", "add", "--help").stdout
    assert "Example:" in shown and "narrative remote add origin" in shown


def test_every_example_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each example's options and arguments are ones its command accepts (parsed by click,
    nothing run)."""
    import shlex

    from cli.help import EXAMPLES

    monkeypatch.chdir(tmp_path)
    commands = dict(_commands())
    for path, example in EXAMPLES.items():
        words = shlex.split(example, comments=True)
        assert words[: 1 + len(path.split())] == ["narrative", *path.split()], example
        args = words[1 + len(path.split()) :]
        try:
            commands[path].make_context(path, args)
        except click.UsageError as exc:
            raise AssertionError(f"{example!r}: {exc.format_message()}") from None


def test_shell_completion_as_the_readme_installs_it(cli: Cli, workspace: Path) -> None:
    """The README's line sets up bash completion; it completes commands and thread names."""
    import os
    import subprocess

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    line = 'eval "$(_NARRATIVE_COMPLETE=bash_source narrative)"'
    assert line in readme
    cli.run("init")
    (workspace / "a.txt").write_text("a\n")
    cli.run("snapshot", "-m", "a")
    cli.run("thread", "create", "feature")
    bin_dir = str(Path(NARRATIVE).parent)
    script = f"""{line}
complete -p narrative
COMP_WORDS=(narrative restore fe); COMP_CWORD=2; _narrative_completion narrative
echo "${{COMPREPLY[@]}}"
COMPREPLY=(); COMP_WORDS=(narrative sta); COMP_CWORD=1; _narrative_completion narrative
echo "${{COMPREPLY[@]}}"
"""
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", "-c", script], cwd=workspace, env=env, capture_output=True, text=True, check=True
    )
    lines = proc.stdout.splitlines()
    assert "_narrative_completion" in lines[0]
    assert lines[1] == "feature" and lines[2] == "status"


@pytest.mark.long  # several seconds: make test stays under ten minutes
def test_env_create_help_lists_each_providers_config_keys(cli: Cli) -> None:
    from providers.registry import available, get_provider_class

    listing = cli.run("env", "create", "--help").stdout
    for name in available():
        assert name in listing
        model = get_provider_class(name).config_model
        shown = cli.run("env", "create", "--provider", name, "--help").stdout
        for field in model.model_fields:
            if field != "type":
                assert f"{field}=" in shown, (name, field)
    docker = " ".join(cli.run("env", "create", "--help", "--provider=docker").stdout.split())
    assert "image=str [default 'narrative-host:1']" in docker
    assert "network=bool | 'host' [default False]" in docker


def test_an_unknown_name_suggests_what_it_may_have_meant(cli: Cli, workspace: Path) -> None:
    """Issue 14 item 4: one "not found" message, with candidates where there are close ones."""
    cli.run("init")
    (workspace / "a.txt").write_text("a\n")
    cli.run("snapshot", "-m", "a")
    cli.run("thread", "create", "feature")
    typo = cli.run("show", "featur", check=False)
    assert typo.returncode == 1 and "did you mean feature?" in typo.stderr, typo.stderr
    unknown = cli.run("restore", "zzzz", check=False)
    assert unknown.returncode == 1 and "narrative log --all" in unknown.stderr
