"""The hub's web view over real HTTP, without a browser (fast): who may see and do what, hostile
names and output escaped, event logs read in bounded pages, the conflict-free merge rules, and
``narrative hub ui`` with no hub serving. The browser tests are in ``test_web.py``."""

from __future__ import annotations

import html
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from gateway.hub.events import RunEventLog
from gateway.hub.server import Hub
from gateway.hub.web import WebView
from narrative.hierarchy import create_thread, finish_run, resolve_thread, start_run
from narrative.snapshot import take_snapshot
from narrative.store import Store
from tests.conftest import Cli
from tests.gateway.conftest import async_test

HOSTILE_NAME = "<img src=x onerror=alert(1)>.txt"
HOSTILE_OUTPUT = "<script>alert('out')</script>"


@asynccontextmanager
async def _view(store: Store) -> AsyncIterator[tuple[Hub, WebView]]:
    hub = Hub(store)
    web = WebView(hub)
    await web.start()
    try:
        async with hub:
            yield hub, web
    finally:
        await web.close()


async def _login(web: WebView, client: httpx.AsyncClient) -> str:
    code = web.codes.issue("owner")
    response = await client.get(f"{web.url}login", params={"code": code})
    assert response.status_code == 303
    return code


def _recorded_run(store: Store, workspace: Path, status: str) -> str:
    """A run recorded as the hub records one: base snapshot, a result with a hostile file name
    and a changed line, and an event log with hostile output."""
    main = resolve_thread(store, None)
    base = take_snapshot(store, main.id, message="base").snapshot
    thread = create_thread(store, main.objective_id, "run-web", forked_from=base.id).id
    run = start_run(store, thread, environment="box", base_snapshot=base.id)
    before = (workspace / "README.md").read_text()
    (workspace / HOSTILE_NAME).write_text("evil\n")
    (workspace / "README.md").write_text("# demo\nchanged line\n")
    result = take_snapshot(store, thread, run.id, "result", track_head=False).snapshot
    (workspace / HOSTILE_NAME).unlink()  # the workspace as it was: the result is the run's
    (workspace / "README.md").write_text(before)
    finish_run(store, run.id, status, 0 if status == "succeeded" else 3, result.id)
    log = RunEventLog(store, run.id)
    log.append("agent.output", stream="stdout", data=HOSTILE_OUTPUT + "\n")
    log.append("run.finished", status=status)
    return run.id


@async_test
async def test_pages_need_a_login_url_that_is_good_once(store: Store) -> None:
    async with _view(store) as (hub, web), httpx.AsyncClient() as client:
        for path in ("", "runs", "environments", "routes", "runs/run-x", "runs/status"):
            response = await client.get(web.url + path)
            assert response.status_code == 401, path
            assert "narrative hub ui" in response.text
        code = await _login(web, client)
        cookie = client.cookies.jar
        session = next(c for c in cookie if c.name == "narrative_session")
        assert session.has_nonstandard_attr("HttpOnly")
        assert (
            "samesite=strict"
            in str(
                (
                    await client.get(f"{web.url}login", params={"code": web.codes.issue("owner")})
                ).headers.get("set-cookie", "")
            ).lower()
        )
        page = await client.get(web.url + "runs")
        assert page.status_code == 200 and "<h1>Runs</h1>" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        async with httpx.AsyncClient() as other:
            again = await other.get(f"{web.url}login", params={"code": code})
        assert again.status_code == 401
    entries = [json.loads(line) for line in Path(hub.audit.path).read_text().splitlines()]
    assert [(e["action"], e["outcome"].split(":")[0]) for e in entries] == [
        ("web:login", "ok"),
        ("web:login", "ok"),
        ("web:login", "refused"),
    ]


@async_test
async def test_actions_need_the_csrf_token_and_no_foreign_origin(
    store: Store, workspace: Path
) -> None:
    run_id = _recorded_run(store, workspace, "succeeded")
    async with _view(store) as (_hub, web), httpx.AsyncClient() as client:
        await _login(web, client)
        page = (await client.get(f"{web.url}runs/{run_id}/merge")).text
        csrf = page.split('name="csrf" value="')[1].split('"')[0]
        merge = f"{web.url}runs/{run_id}/merge"
        for data, headers in (
            ({"confirm": "yes"}, {}),
            ({"confirm": "yes", "csrf": "forged"}, {}),
            ({"confirm": "yes", "csrf": csrf}, {"Origin": "http://evil.example"}),
        ):
            refused = await client.post(merge, data=data, headers=headers)
            assert refused.status_code == 403
        assert "changed line" not in (workspace / "README.md").read_text()
        unconfirmed = await client.post(merge, data={"csrf": csrf})
        assert unconfirmed.status_code == 400
        done = await client.post(merge, data={"csrf": csrf, "confirm": "yes"})
        assert done.status_code == 200
        assert f"merged {run_id}" in html.unescape(done.text)
    assert "changed line" in (workspace / "README.md").read_text()
    assert (workspace / HOSTILE_NAME).read_text() == "evil\n"


@async_test
async def test_a_failed_run_is_not_mergeable_from_the_page(store: Store, workspace: Path) -> None:
    run_id = _recorded_run(store, workspace, "failed")
    async with _view(store) as (hub, web), httpx.AsyncClient() as client:
        await _login(web, client)
        page = (await client.get(f"{web.url}runs/{run_id}")).text
        assert 'id="merge" disabled' in page
        csrf = page.split('name="csrf" value="')[1].split('"')[0]
        refused = await client.post(
            f"{web.url}runs/{run_id}/merge", data={"csrf": csrf, "confirm": "yes"}
        )
        assert refused.status_code == 409 and "did not succeed" in refused.text
    audit = Path(hub.audit.path).read_text()
    assert '"action": "web:merge"' in audit and "refused: the run did not succeed" in audit


@async_test
async def test_hostile_file_names_and_output_are_escaped(store: Store, workspace: Path) -> None:
    run_id = _recorded_run(store, workspace, "succeeded")
    async with _view(store) as (_hub, web), httpx.AsyncClient() as client:
        await _login(web, client)
        page = (await client.get(f"{web.url}runs/{run_id}")).text
    assert HOSTILE_NAME not in page and HOSTILE_OUTPUT not in page
    assert html.escape(HOSTILE_NAME, quote=True) in page or "&lt;img src=x" in page
    assert "&lt;script&gt;alert(" in page
    assert '<span class="l-add">+changed line</span>' in page


def test_event_logs_are_read_in_bounded_pages(store: Store) -> None:
    log = RunEventLog(store, "run-big")
    for i in range(3000):
        log.append("agent.output", stream="stdout", data=f"line {i} " + "x" * 300)
    size = Path(log.path).stat().st_size
    assert size > 900_000
    seen, offset, biggest = [], 0, 0
    while True:
        page, after = log.read_page(offset, 64 << 10)
        if after == offset:
            break
        biggest = max(biggest, after - offset)
        seen += [e["seq"] for e in page]
        offset = after
    assert seen == list(range(1, 3001)) and offset == size
    assert biggest <= (64 << 10)
    start = log.tail_offset(10_000)
    tail, end = log.read_page(start, 10_000)
    assert end == size and tail and tail[-1]["seq"] == 3000
    with open(log.path, "rb") as f:
        f.seek(start - 1)
        assert f.read(1) == b"\n"  # the tail starts at a whole line
    log.append("agent.output", stream="stdout", data="y" * 200_000)  # longer than a page
    page, after = log.read_page(size, 64 << 10)
    assert [e["seq"] for e in page] == [3001] and after == Path(log.path).stat().st_size


def test_hub_ui_without_a_serving_hub_says_so(cli: Cli) -> None:
    cli.run("init")
    proc = cli.run("hub", "ui", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "narrative: error: no hub serves this store: start one with 'narrative serve'"
    ]


@pytest.mark.parametrize("status", ["running", "failed", "killed", "cancelled"])
def test_only_a_succeeded_run_with_a_result_is_mergeable(store: Store, status: str) -> None:
    from gateway.hub.web.views import mergeable
    from narrative.models import AgentRun

    run = AgentRun(id="run-x", thread_id="th-x", status=status, result_snapshot="snap-x")
    assert mergeable(run)[0] is False
    good = AgentRun(id="run-x", thread_id="th-x", status="succeeded", result_snapshot="snap-x")
    assert mergeable(good) == (True, "")


@async_test
async def test_overview_marks_forks_merges_and_remote_heads(store: Store, workspace: Path) -> None:
    from narrative.shared import REMOTE_REF_PREFIX
    from narrative.workspace_merge import merge_workspace

    run_id = _recorded_run(store, workspace, "succeeded")
    merge_workspace(store, run_id)
    main = resolve_thread(store, None)
    head = store.refs.read(store.thread_ref(main.id))
    assert head is not None
    store.refs.update(f"{REMOTE_REF_PREFIX}origin/threads/{main.id}", head)
    async with _view(store) as (_hub, web), httpx.AsyncClient() as client:
        await _login(web, client)
        page = html.unescape((await client.get(web.url)).text)
    assert "run-web" in page and "forked from" in page
    assert page.count('<span class="tag">merge</span>') == 1  # the merge snapshot only
    assert f'<span class="tag remote">origin/{main.name}</span>' in page


def test_diff_lines_are_highlighted_by_language() -> None:
    from gateway.hub.web.views import highlight, language_of

    assert language_of("src/app.py") == "py" and language_of("README") is None
    assert highlight('if x: return "a#b"  # why', "py") == [
        ("kw", "if"),
        ("", " x: "),
        ("kw", "return"),
        ("", " "),
        ("str", '"a#b"'),
        ("", "  "),
        ("com", "# why"),
    ]
    assert highlight("a // b", "py") == [("", "a // b")]  # floor division, not a comment
    assert highlight("x = 1 // one", "js")[-1] == ("com", "// one")


@async_test
async def test_highlighted_code_is_still_escaped(store: Store, workspace: Path) -> None:
    main = resolve_thread(store, None)
    base = take_snapshot(store, main.id, message="base").snapshot
    thread = create_thread(store, main.objective_id, "run-code", forked_from=base.id).id
    run = start_run(store, thread, environment="box", base_snapshot=base.id)
    (workspace / "evil.py").write_text('tag = "<script>alert(1)</script>"  # <b>bold</b>\n')
    result = take_snapshot(store, thread, run.id, "result", track_head=False).snapshot
    finish_run(store, run.id, "succeeded", 0, result.id)
    async with _view(store) as (_hub, web), httpx.AsyncClient() as client:
        await _login(web, client)
        page = (await client.get(f"{web.url}runs/{run.id}")).text
    assert "<script>alert" not in page and "<b>bold" not in page
    assert '<span class="t-str">&#34;&lt;script&gt;alert(1)&lt;/script&gt;&#34;</span>' in page
    assert '<span class="t-com"># &lt;b&gt;bold&lt;/b&gt;</span>' in page


def test_serve_without_a_web_view(cli: Cli, workspace: Path) -> None:
    from tests.gateway.hub.hub_support import serve

    cli.run("init")
    with serve(cli, workspace, "--no-web") as ready:
        assert ready["web"] is None
        proc = cli.run("hub", "ui", check=False)
    assert proc.returncode == 1
    assert "serves no web view" in proc.stderr and len(proc.stderr.splitlines()) == 1


@async_test
async def test_no_secrets_of_a_run_request_in_its_page(store: Store, workspace: Path) -> None:
    run_id = _recorded_run(store, workspace, "succeeded")
    request = {"environment": "box", "env": {"API_KEY": "sk-live-123"}, "argv": ["true"]}
    RunEventLog(store, run_id).append("run.created", environment="box", request=request)
    async with _view(store) as (_hub, web), httpx.AsyncClient() as client:
        await _login(web, client)
        page = html.unescape((await client.get(f"{web.url}runs/{run_id}")).text)
    assert "sk-live-123" not in page
    assert "'API_KEY': '(hidden)'" in page and "environment=box" in page


def test_a_busy_web_port_is_one_clear_error(cli: Cli) -> None:
    import socket

    cli.run("init")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        proc = cli.run("serve", "--port", "0", "--web-port", port, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"narrative: error: cannot serve the web view on 127.0.0.1:{port}: Address already in use"
    ]
