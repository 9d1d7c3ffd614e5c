"""The hub's web view in a real browser (Debian's chromium driven by Playwright; never a
downloaded browser), as a person uses it: log in with the URL ``narrative hub ui`` prints, watch
runs finish without reloading, read a run's diff and its (hostile) output, stop a run, merge a
good one and find a failed one not mergeable; plus the checks a person cannot see (cookie
flags, CSRF, a used login URL) and the basics of accessibility.

Screenshots of every page are saved under the test's tmp dir (``screens/``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NARRATIVE, Cli
from tests.gateway.hub.hub_support import serve, wait_for_output

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [pytest.mark.long, pytest.mark.timeout(240)]

#: An agent printing markup the page must show as text (it would set window.pwned if run).
HOSTILE = "<script>window.pwned=1</script><img src=x onerror=window.pwned=2>"


def _browser_or_skip() -> Any:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("NARRATIVE_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    return sync_api


@pytest.fixture
def web_cli(cli: Cli) -> Cli:
    cli.run("init")
    for name in ("streamer", "quick", "broken", "patient"):
        cli.run("env", "create", name, "--provider", "worktree")
    return cli


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[Any]:
    sync_api = _browser_or_skip()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            yield context.new_page()
        finally:
            browser.close()


def _start(workspace: Path, env: str, script: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [NARRATIVE, "run", "start", "--env", env, "--json", "--", "sh", "-c", script],
        cwd=workspace,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finished(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=120)
    assert out, err
    return dict(json.loads(out))


def _contrast(fg: str, bg: str) -> float:
    def luminance(css: str) -> float:
        r, g, b = (int(v) for v in re.findall(r"\d+", css)[:3])

        def channel(c: int) -> float:
            s = c / 255
            return s / 12.92 if s <= 0.03928 else float(((s + 0.055) / 1.055) ** 2.4)

        return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)

    hi, lo = sorted((luminance(fg), luminance(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def _post_status(url: str, cookie: str, data: bytes) -> int:
    request = urllib.request.Request(url, data=data, method="POST", headers={"Cookie": cookie})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_a_person_watches_runs_reads_diffs_stops_and_merges(
    web_cli: Cli, workspace: Path, browser_page: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    page = browser_page
    screens = tmp_path / "screens"
    screens.mkdir()

    def shot(name: str) -> None:
        page.screenshot(path=str(screens / f"{name}.png"), full_page=True)

    with serve(web_cli, workspace) as ready:
        base = ready["web"]
        assert base.startswith("http://127.0.0.1:")
        failed = web_cli.run(
            "run", "start", "--env", "broken", "--json", "--", "sh", "-c", "echo oops >&2; exit 3",
            check=False,
        )  # fmt: skip
        failed_run = json.loads(failed.stdout)
        assert failed_run["status"] == "failed"
        # not logged in: nothing to see
        page.goto(base + "runs")
        expect(page.get_by_role("alert")).to_contain_text("narrative hub ui")

        login = web_cli.run("hub", "ui").stdout.strip()
        assert login.startswith(base + "login?code=")
        page.goto(login)
        assert page.url == base  # the code left the address bar
        cookie = next(c for c in page.context.cookies() if c["name"] == "narrative_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        page.goto(login)  # a login URL is good once
        expect(page.get_by_role("alert")).to_contain_text("unknown, used or expired")

        # the streaming run turns from running to succeeded without a reload
        streamer = _start(
            workspace,
            "streamer",
            "for i in 1 2 3 4 5 6 7 8 9 10; do echo line-$i; sleep 0.5; done; "
            f"printf '%s\\n' '{HOSTILE}'; echo streamed >> README.md",
        )
        streaming_id = wait_for_output(workspace, "line-1")
        page.goto(f"{base}runs/{streaming_id}")
        status = page.locator("#run-status")
        expect(status).to_have_text("running")
        page.evaluate("window.loadedOnce = true")
        expect(page.locator("#events")).to_contain_text("line-3", timeout=30_000)
        shot("run-running")
        expect(status).to_have_text("succeeded", timeout=60_000)
        assert page.evaluate("window.loadedOnce") is True  # the same document: no reload
        # the agent's markup is shown as text and never ran
        expect(page.locator("#events")).to_contain_text(HOSTILE)
        assert page.evaluate("window.pwned") is None
        # the diff shows the changed file and its lines
        expect(page.get_by_role("list", name="Changed files")).to_contain_text("README.md")
        expect(page.locator(".l-add", has_text="+streamed")).to_be_visible()
        expect(page.locator("#merge")).to_be_enabled()
        shot("run-succeeded")
        _finished(streamer)

        # the failed run cannot be merged from the page either
        page.goto(f"{base}runs/{failed_run['id']}")
        expect(page.locator("#run-status")).to_have_text("failed")
        expect(page.locator("#merge")).to_be_disabled()
        expect(page.locator("#merge-why")).to_contain_text("did not succeed")
        expect(page.locator("#events")).to_contain_text("oops")
        shot("run-failed")

        # stop works: the Stop button, reached with the keyboard
        patient = _start(workspace, "patient", "echo started; while true; do sleep 0.1; done")
        patient_id = wait_for_output(workspace, "started")
        page.goto(f"{base}runs/{patient_id}")
        expect(page.locator("#run-status")).to_have_text("running")
        for _ in range(40):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.id") == "stop":
                break
        else:
            raise AssertionError("the Stop button cannot be reached with Tab")
        page.keyboard.press("Enter")
        expect(page.locator("#run-status")).to_have_text("cancelled", timeout=60_000)
        assert _finished(patient)["status"] == "cancelled"
        stopped = [
            e
            for e in web_cli.json("run", "show", patient_id)["events"]
            if e["type"] == "run.requested"
        ]
        assert stopped and stopped[0]["action"] == "stop" and "owner" in stopped[0]["by"]

        # the runs table: every run, live statuses, a filter
        page.goto(base + "runs")
        rows = page.locator("#runs-table tbody tr")
        expect(rows).to_have_count(3)
        shot("runs")
        page.get_by_label("Status").select_option("failed")
        page.get_by_role("button", name="Filter").click()
        expect(rows).to_have_count(1)
        expect(rows.first).to_contain_text(failed_run["id"])

        # merge: a confirmation, then the CLI's report
        page.goto(f"{base}runs/{streaming_id}")
        page.locator("#merge").click()
        confirmation = page.get_by_label("I want to merge these changes into the workspace")
        expect(confirmation).to_be_visible()
        shot("merge-confirm")
        confirmation.check()
        page.get_by_role("button", name="Merge", exact=True).click()
        expect(page.locator("#merge-report")).to_contain_text(f"merged {streaming_id}")
        shot("merge-report")
        assert "streamed" in (workspace / "README.md").read_text()
        audit = web_cli.json("hub", "audit")
        actions = {(e["action"], e["outcome"]) for e in audit["items"]}
        assert ("web:run.stop", "ok") in actions and ("web:merge", "ok") in actions

        # the other pages
        for path, heading in (
            ("", "Overview"),
            ("environments", "Environments"),
            ("routes", "Routes"),
        ):
            page.goto(base + path)
            expect(page.get_by_role("heading", level=1)).to_have_text(heading)
            shot(path or "overview")
        expect(page.get_by_role("heading", name="Routing rules")).to_be_visible()
        expect(page.get_by_role("img", name=re.compile("hub and the .* connected"))).to_be_visible()
        # environments: the log tail follows without a reload; a button acts as the CLI does
        page.goto(base + "environments")
        page.evaluate("window.loadedOnce = true")
        web_cli.run("env", "stop", "quick")
        quick_log = page.locator("pre.envlog[data-env='quick']")
        expect(quick_log).to_contain_text("-> stopped", timeout=15_000)
        assert page.evaluate("window.loadedOnce") is True
        page.get_by_role("button", name="Start quick", exact=True).click()
        expect(page.locator("pre.envlog[data-env='quick']")).to_contain_text("-> running")
        assert web_cli.json("env", "show", "quick")["state"] == "running"

        # accessibility basics: every control labelled, buttons named, status colours legible
        page.goto(base + "runs")
        unlabelled = page.evaluate(
            """() => [...document.querySelectorAll('input:not([type=hidden]), select')]
                .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
                .map(e => e.outerHTML)"""
        )
        assert unlabelled == []
        unnamed = page.evaluate(
            "() => [...document.querySelectorAll('button')].filter(b => !b.textContent.trim())"
            ".length"
        )
        assert unnamed == 0
        for status_name in ("succeeded", "failed", "cancelled"):
            badge = page.locator(f".status-{status_name}").first
            fg, bg = badge.evaluate(
                "e => [getComputedStyle(e).color, getComputedStyle(e).backgroundColor]"
            )
            assert _contrast(fg, bg) >= 4.5, (status_name, fg, bg)

        # a POST without the session's CSRF token is refused
        session = f"narrative_session={cookie['value']}"
        assert _post_status(f"{base}runs/{patient_id}/kill", session, b"csrf=wrong") == 403
        headers = page.request.get(base + "runs").headers
        assert "script-src 'self'" in headers["content-security-policy"]
    assert sorted(p.name for p in screens.iterdir()) == [
        "environments.png",
        "merge-confirm.png",
        "merge-report.png",
        "overview.png",
        "routes.png",
        "run-failed.png",
        "run-running.png",
        "run-succeeded.png",
        "runs.png",
    ]
