"""A failed run's result is never applied by accident (issue 12 bug 4).

``merge RUN`` and ``diff RUN`` of a run that did not succeed refuse unless ``--allow-failed``;
even then a result deleting more than half of its base's files needs ``--force``; and a run
whose environment never received its input has no result at all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from narrative.store import Store
from tests.conftest import Cli, git, tree_bytes


def _user_files(ws: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree_bytes(ws).items() if not k.startswith(".narrative")}


def _wiping_run(cli: Cli, *extra: str) -> dict[str, object]:
    proc = cli.run(
        "run", "start", "--env", "wt", *extra, "--json", "--",
        "sh", "-c", "rm -rf ./* && exit 3",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    run: dict[str, object] = json.loads(proc.stdout)
    assert run["status"] == "failed" and run["exit_code"] == 3
    return run


def test_merge_and_diff_of_a_failed_run_refuse_and_keep_the_users_files(
    cli: Cli, workspace: Path
) -> None:
    cli.run("init")
    for i in range(4):
        (workspace / f"f{i}.txt").write_text(f"{i}\n")
    cli.run("snapshot", "-m", "base")
    cli.run("env", "create", "wt", "--provider", "worktree")
    for extra in ((), ("--direct",)):
        run = _wiping_run(cli, *extra)
        before = _user_files(workspace)
        for command in (["merge", str(run["id"])], ["diff", str(run["id"])]):
            proc = cli.run(*command, check=False)
            assert proc.returncode == 1, (command, proc.stdout)
            assert "did not succeed" in proc.stderr and "--allow-failed" in proc.stderr
            assert "Traceback" not in proc.stderr
        assert _user_files(workspace) == before
        # asked for, the diff is shown; the merge still wants --force for a wipe
        assert "f1.txt" in cli.run("diff", str(run["id"]), "--allow-failed", "--name-status").stdout
        wipe = cli.run("merge", str(run["id"]), "--allow-failed", check=False)
        assert wipe.returncode == 1 and "--force" in wipe.stderr
        assert _user_files(workspace) == before
    forced = cli.run("merge", str(run["id"]), "--allow-failed", "--force", check=False)
    assert forced.returncode == 0, forced.stderr
    assert not (workspace / "f1.txt").exists()
    git("--git-dir", Store.open(workspace=str(workspace)).git_dir, "fsck", "--strict")


def test_a_run_whose_environment_never_got_its_input_has_no_result(
    cli: Cli, workspace: Path
) -> None:
    cli.run("init")
    cli.run("snapshot", "-m", "base")
    cli.run("env", "create", "wt", "--provider", "worktree")
    checkout = Path(cli.json("env", "show", "wt")["resource_id"])
    # the checkout is replaced by a file: the base cannot be restored into it
    shutil.rmtree(checkout)
    checkout.write_text("not a directory\n")
    proc = cli.run("run", "start", "--env", "wt", "--direct", "--json", "--", "true", check=False)
    assert proc.returncode == 1
    runs = cli.items("run", "list")
    assert runs and runs[-1]["result_snapshot"] is None
    merge = cli.run("merge", runs[-1]["id"], "--allow-failed", check=False)
    assert merge.returncode == 1 and "no result" in merge.stderr
