"""Attack 5 of issue 13, the result half: secrets an agent writes into its checkout do not come
home, and a result cannot quietly change what the store ignores or how the gateway routes.

Driven through the real CLI and hub: an agent in a ``worktree`` environment (in its sandbox,
the default) or a Docker container dumps its environment (its gateway token included) into
``env-dump.txt``, writes ``.aws/credentials``, overwrites the user's ``id_rsa`` and puts a PEM
private key into ``notes.txt``, next to real work. ``merge RUN`` brings the work and none of
the secrets (listed as skipped; the user's ``id_rsa`` untouched; the token in no object a thread
reaches, checked with stock git); the negative control, the same run merged with
``--include-secrets`` (the filter off), shows the token arriving. A result (or snapshot) that
changes ``.gitignore``/``.narrativeignore``/``proxyExecution.json`` is refused without
``--force``, with the store and the workspace byte-identical.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from narrative.credentials import secret_content_problem, secret_forms
from narrative.hierarchy import create_thread, get_thread, start_run
from narrative.history import resolve_snapshot
from narrative.runs import WITHHELD_REF_PREFIX, incoming_ref, withheld_files
from narrative.screening import withhold_secrets
from narrative.snapshot import take_snapshot
from narrative.store import Store
from tests.conftest import Cli, git, store_dir_of, tree_bytes
from tests.e2e.security.conftest import ISOLATED_PROVIDERS, env_create_args, sandbox_or_skip

USER_KEY = "the user's own key\n"
AGENT_KEY = "the agent's key\n"
#: The agent: secrets next to real work.
AGENT = r"""
env > env-dump.txt
mkdir -p .aws
printf '[default]\naws_access_key_id = AKIAABCDEFGHIJKLMNOP\n' > .aws/credentials
printf "the agent's key\n" > id_rsa
printf 'my notes\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE=\n' > notes.txt
printf -- '-----END OPENSSH PRIVATE KEY-----\n' >> notes.txt
echo "real work" > work.txt
"""
SECRETS = [".aws/credentials", "env-dump.txt", "id_rsa", "notes.txt"]
_TOKEN = re.compile(rb"NARRATIVE_GATEWAY_TOKEN=(ng2\.[A-Za-z0-9_.-]+)")


@pytest.fixture(params=ISOLATED_PROVIDERS)
def provider(request: pytest.FixtureRequest, tmp_path: Path) -> list[str]:
    """``env create`` arguments of the environment the agent runs in."""
    return env_create_args(request, request.param, tmp_path)


def run_agent(cli: Cli, workspace: Path, env_args: list[str], script: str) -> str:
    """The user's repository (with their own ``id_rsa``), a store, environment ``box``, and
    ``script`` run there through the hub; the run's id."""
    (workspace / "id_rsa").write_text(USER_KEY)
    (workspace / ".gitignore").write_text("*.log\n")
    git("init", "-q", cwd=workspace)
    git("add", "-A", cwd=workspace)
    git("commit", "-qm", "user's work", cwd=workspace)
    cli.run("init")
    cli.run("env", "create", "box", *env_args)
    proc = cli.run("run", "start", "--env", "box", "--json", "--", "sh", "-c", script)
    run = json.loads(proc.stdout)
    assert run["status"] == "succeeded", proc.stderr
    return str(run["id"])


def thread_objects(store_dir: Path) -> bytes:
    """Every object any thread reaches, as stock git reads them."""
    heads = git("for-each-ref", "--format=%(objectname)", "refs/narrative/threads", cwd=store_dir)
    listed = subprocess.run(
        ["git", "rev-list", "--objects", "--stdin"],
        cwd=store_dir,
        input=heads,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ids = "".join(line.split(" ")[0] + "\n" for line in listed.splitlines())
    return subprocess.run(
        ["git", "cat-file", "--batch"],
        cwd=store_dir,
        input=ids.encode(),
        capture_output=True,
        check=True,
    ).stdout


def store_bytes(store_dir: Path) -> dict[str, bytes]:
    """The store's files but its lock files (a refused merge takes and releases them)."""
    return {k: v for k, v in tree_bytes(store_dir).items() if not k.endswith(".lock")}


def workspace_bytes(workspace: Path) -> bytes:
    files = tree_bytes(workspace)
    return b"".join(v for k, v in files.items() if not k.startswith((".narrative", ".git/")))


@pytest.mark.parametrize("include_secrets", [False, True], ids=["guarded", "filter-off"])
def test_secrets_an_agent_writes_do_not_come_home(
    cli: Cli, workspace: Path, provider: list[str], include_secrets: bool
) -> None:
    run_id = run_agent(cli, workspace, provider, AGENT)
    store_dir = store_dir_of(workspace)
    # the agent did write its token: the unscreened result (local only) holds it (with no
    # screening at all, the run's recorded result would)
    withheld = f"refs/narrative/withheld/{run_id}"
    if not git("rev-parse", "-q", "--verify", withheld, cwd=store_dir, check=False).strip():
        withheld = cli.json("run", "show", run_id)["result_snapshot"]
        withheld = cli.json("show", withheld)["commit"]
    dump = git("show", f"{withheld}:env-dump.txt", cwd=store_dir)
    found = _TOKEN.search(dump.encode())
    assert found is not None, dump
    token = found.group(1)

    diff = cli.run("diff", run_id, "--name-status", *(["--include-secrets"] * include_secrets))
    flag = ["--include-secrets"] if include_secrets else []
    merged = cli.run("merge", run_id, "--json", *flag)
    data = json.loads(merged.stdout)
    assert data["clean"] and data["snapshot"], data
    assert (workspace / "work.txt").read_text() == "real work\n"
    if include_secrets:  # negative control: without the filter, the token arrives
        assert [s["path"] for s in data["skipped"]] == []
        assert token in (workspace / "env-dump.txt").read_bytes()
        assert (workspace / "id_rsa").read_text() == AGENT_KEY
        assert "PRIVATE KEY" in (workspace / "notes.txt").read_text()
        assert (workspace / ".aws" / "credentials").exists()
        assert token in thread_objects(store_dir)  # the merge snapshot holds it now
        return
    assert token not in workspace_bytes(workspace)
    assert token not in thread_objects(store_dir)
    # the unscreened result never sat on a thread, even for a moment: no thread's head log
    # (every move of a thread head, in git's reflog format) names it
    raw = git("rev-parse", withheld, cwd=store_dir).strip()
    head_logs = (store_dir / "logs" / "refs" / "narrative" / "threads").rglob("*")
    assert not [p for p in head_logs if p.is_file() and raw in p.read_text()]
    assert b"BEGIN OPENSSH PRIVATE KEY" not in thread_objects(store_dir)
    for path in ("env-dump.txt", ".aws", "notes.txt"):
        assert not (workspace / path).exists(), path
    assert (workspace / "id_rsa").read_text() == USER_KEY  # skipped, never changed or deleted
    assert sorted(s["path"] for s in data["skipped"]) == SECRETS, data
    assert all(s["reason"] for s in data["skipped"])
    assert "--include-secrets" in diff.stderr and "env-dump.txt" in diff.stderr
    assert "work.txt" in diff.stdout and "env-dump.txt" not in diff.stdout
    human = cli.run("diff", run_id, "--stat")
    assert "secret-looking" in human.stderr and "--include-secrets" in human.stderr

    # asked for, they come
    again = cli.json("merge", run_id, "--include-secrets")
    assert again["clean"] and again["skipped"] == [], again
    assert token in (workspace / "env-dump.txt").read_bytes()
    assert (workspace / "id_rsa").read_text() == AGENT_KEY


def test_a_result_deleting_the_users_credentials_leaves_them(cli: Cli, workspace: Path) -> None:
    """Withheld is skipped, never deleted: a run that removes ``id_rsa`` does not remove the
    user's copy on merge (``--direct``, so the provider's own collection path is screened)."""
    sandbox_or_skip()
    cli.run("init")
    (workspace / "id_rsa").write_text(USER_KEY)
    cli.run("env", "create", "box", "--provider", "worktree")
    fake = "ghp_" + "a1B2" * 9  # a GitHub token's shape
    script = f"rm id_rsa && echo GITHUB_TOKEN={fake} > env-dump.txt && echo done > work.txt"
    proc = cli.run("run", "start", "--env", "box", "--direct", "--json", "--", "sh", "-c", script)
    run_id = json.loads(proc.stdout)["id"]
    merged = cli.json("merge", run_id)
    assert sorted(s["path"] for s in merged["skipped"]) == ["env-dump.txt", "id_rsa"], merged
    assert (workspace / "id_rsa").read_text() == USER_KEY
    assert (workspace / "work.txt").exists() and not (workspace / "env-dump.txt").exists()


PROTECTED_AGENT = r"""
echo 'work.txt' >> .gitignore
printf '{"version": 1, "rules": []}\n' > proxyExecution.json
echo "real work" > work.txt
"""


def test_a_result_changing_ignore_files_or_routing_needs_force(
    cli: Cli, workspace: Path, provider: list[str]
) -> None:
    run_id = run_agent(cli, workspace, provider, PROTECTED_AGENT)
    store_dir = store_dir_of(workspace)
    before = (tree_bytes(workspace), store_bytes(store_dir))
    refused = cli.run("merge", run_id, check=False)
    assert refused.returncode == 1, refused.stdout
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert ".gitignore" in lines[0] and "proxyExecution.json" in lines[0], lines
    assert "--force" in lines[0]
    assert (tree_bytes(workspace), store_bytes(store_dir)) == before  # nothing written anywhere

    forced = cli.json("merge", run_id, "--force")
    assert forced["clean"] and forced["snapshot"], forced
    assert (workspace / ".gitignore").read_text() == "*.log\nwork.txt\n"
    assert (workspace / "proxyExecution.json").exists()


def test_a_snapshot_merge_changing_narrativeignore_needs_force(cli: Cli, workspace: Path) -> None:
    cli.run("init")
    base = cli.json("snapshot", "-m", "base")["id"]
    (workspace / ".narrativeignore").write_text("*.tmp\n")
    theirs = cli.json("snapshot", "-m", "ignore src")["id"]
    cli.run("restore", base)
    store_dir = store_dir_of(workspace)
    before = (tree_bytes(workspace), store_bytes(store_dir))
    refused = cli.run("merge", theirs, check=False)
    assert refused.returncode == 1 and ".narrativeignore" in refused.stderr, refused.stderr
    assert (tree_bytes(workspace), store_bytes(store_dir)) == before
    cli.run("merge", theirs, "--force")
    assert (workspace / ".narrativeignore").read_text() == "*.tmp\n"


def test_the_gateway_key_and_the_runs_tokens_are_found_in_any_encoding(
    store: Store, workspace: Path, tmp_path: Path
) -> None:
    """The content rule looks for the exact secrets the caller knows (the gateway key raw, in
    hex or base64; the run's tokens) besides the well-known shapes; a harmless file passes,
    and screening twice changes nothing."""
    key = bytes(range(7, 39))
    base = take_snapshot(store, message="base").snapshot
    thread = create_thread(store, get_thread(store, base.thread).objective_id, "r", base.id)
    run = start_run(store, thread.id, base_snapshot=base.id)
    env = tmp_path / "env"
    shutil.copytree(workspace, env, ignore=shutil.ignore_patterns(".narrative*"))
    (env / "key-hex.txt").write_text(f"key: {key.hex()}\n")
    (env / "key-b64.txt").write_bytes(base64.b64encode(key) + b"\n")
    (env / "key-raw.bin").write_bytes(b"\0" + key)
    (env / "pat.txt").write_text("github_pat_" + "x1" * 20 + "\n")
    (env / "plain.txt").write_text("sk-short, AKIA-not-a-key, ng2 mentioned\n")
    staged = incoming_ref(run.id)  # where every provider puts a run's result
    result = take_snapshot(
        store, thread.id, run.id, "result", workspace=str(env), stage_as=staged
    ).snapshot
    assert store.refs.read(store.thread_ref(thread.id)) is None  # not on the thread yet
    known = secret_forms(key)
    screened = withhold_secrets(store, run.id, result.id, known)
    assert screened is not None and screened != result.id
    # the raw result never reached the thread: not its head, not in its head log (stock git)
    assert store.refs.read(staged) is None
    assert store.refs.read(WITHHELD_REF_PREFIX + run.id) == bytes.fromhex(result.commit)
    head_log = git("reflog", "show", "--format=%H", store.thread_ref(thread.id), cwd=store.git_dir)
    assert result.commit not in head_log.split()
    snap = resolve_snapshot(store, screened)
    withheld = {w["path"]: w["reason"] for w in withheld_files(snap)}
    assert sorted(withheld) == ["key-b64.txt", "key-hex.txt", "key-raw.bin", "pat.txt"], withheld
    assert "well-known" in withheld["pat.txt"] and "of this run" in withheld["key-hex.txt"]
    assert "plain.txt" in git("ls-tree", "-r", "--name-only", snap.commit, cwd=store.git_dir)
    assert snap.parent_commit == base.commit  # no commit the agent made reaches it
    assert withhold_secrets(store, run.id, screened, known) == screened
    ng2 = b"ng2.abcdefghijklmnopqrstu." + b"A" * 43
    assert secret_content_problem(b"x" * 100 + b"\nTOKEN=" + ng2 + b"\n") is not None
