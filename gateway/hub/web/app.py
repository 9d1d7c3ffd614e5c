"""The hub's web view: a Starlette app on a listener of its own (see docs/decisions.md), pages
rendered on the server with Jinja2 (autoescaped: agent output, file names and diffs are hostile
input), live parts over Server-Sent Events, a little plain JavaScript, every asset in the
package.

Only a browser holding a session may see anything: ``narrative hub ui`` asks the hub (with the
owner's control token, checked and audited like every ``hub:*`` call) for a one-time login URL.
Actions are POSTs carrying the session's CSRF token; each is checked as the CLI's is, written
to the team audit log with who did it, and, for a run, to the run's event log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode

import jinja2
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.errors import Unavailable
from gateway.handlers import HandlerContext
from narrative.errors import NarrativeError
from narrative.hierarchy import get_run
from narrative.merge_report import merge_summary
from narrative.models import AgentRun
from narrative.runs import resolve_run
from narrative.workspace_merge import merge_workspace

from ..client import kill_run, stop_run
from ..events import RunEventLog
from . import views
from .auth import SESSION_COOKIE, LoginCodes, Session, Sessions
from .transport import InLoopServer, SecurityHeaders, event_stream, sse

if TYPE_CHECKING:
    from ..server import Hub

__all__ = ["WebView"]

log = logging.getLogger(__name__)

_HERE = os.path.dirname(os.path.abspath(__file__))
_TAIL_BYTES = 256 << 10
_PAGE_BYTES = 256 << 10
_POLL = 0.25


class WebView:
    """The web view of ``hub``, served on ``host:port`` (port 0: a free one).

    Args:
        hub: The hub whose store, environments, runs and gateway are shown.
        host: Interface to listen on (loopback by default: see docs/security.md).
        port: Port (0: a free one; :attr:`url` then has the one chosen).
    """

    def __init__(self, hub: Hub, host: str = "127.0.0.1", port: int = 0) -> None:
        self.hub = hub
        self.store = hub.store
        self.host = host
        self.port = port
        self.codes = LoginCodes()
        self.sessions = Sessions()
        self._closing = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: InLoopServer | None = None
        self._serving: asyncio.Task[None] | None = None
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(os.path.join(_HERE, "templates")),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.app = Starlette(
            routes=self._routes(), exception_handlers={HTTPException: self._error_page}
        )
        hub.gateway.handlers.register("hub", "webLogin", self._login_handler)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    # -- serving --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen, and tell the hub its URL (announced with the hub, found by ``hub ui``)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise Unavailable(
                f"cannot serve the web view on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            SecurityHeaders(self.app),
            log_config=None,  # the hub's own logging, not a config of uvicorn's
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._server = InLoopServer(config)
        self._serving = asyncio.get_running_loop().create_task(self._server.serve([sock]))
        while not self._server.started:
            if self._serving.done():
                await self._serving  # raises what stopped it
                raise OSError("the web view stopped while starting")
            await asyncio.sleep(0.01)
        self.hub.web_url = self.url

    async def close(self) -> None:
        self._closing.set()
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            await self._serving
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 5)

    async def _login_handler(self, ctx: HandlerContext, payload: dict[str, Any]) -> dict[str, Any]:
        """``hub:webLogin``: a one-time login URL, for the owner's control token only."""
        self.hub.check_control(ctx, "webLogin", None)
        code = self.codes.issue("owner")
        return {"url": f"{self.url}login?{urlencode({'code': code})}", "expiresIn": self.codes.ttl}

    def _routes(self) -> list[Route | Mount]:
        return [
            Route("/", self._page(self.overview)),
            Route("/login", self.login),
            Route("/logout", self._action(self.logout), methods=["POST"]),
            Route("/runs", self._page(self.runs)),
            Route("/runs/status", self._page(self.runs_status)),
            Route("/runs/{run}", self._page(self.run)),
            Route("/runs/{run}/events", self._page(self.run_events)),
            Route("/runs/{run}/stream", self._page(self.run_stream)),
            Route("/runs/{run}/panel", self._page(self.run_panel)),
            Route("/runs/{run}/stop", self._action(self.run_stop), methods=["POST"]),
            Route("/runs/{run}/kill", self._action(self.run_kill), methods=["POST"]),
            Route("/runs/{run}/merge", self._page(self.merge_confirm)),
            Route("/runs/{run}/merge", self._action(self.merge), methods=["POST"]),
            Route("/environments", self._page(self.environments)),
            Route("/environments/logs", self._page(self.environment_logs)),
            Route("/environments/{env}/{act}", self._action(self.env_action), methods=["POST"]),
            Route("/routes", self._page(self.routes)),
            Mount("/static", StaticFiles(directory=os.path.join(_HERE, "static")), name="static"),
        ]

    # -- authority ------------------------------------------------------------------------------

    def _session(self, request: Request) -> Session:
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is None:
            raise HTTPException(401, "log in with the URL `narrative hub ui` prints")
        return session

    def _page(
        self, handler: Callable[[Request, Session], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def page(request: Request) -> Response:
            return await handler(request, self._session(request))

        return page

    def _action(
        self, handler: Callable[[Request, Session, dict[str, str]], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """A POST: needs the session and its CSRF token (and no foreign Origin)."""

        async def action(request: Request) -> Response:
            session = self._session(request)
            origin = request.headers.get("origin")
            if origin is not None and origin.rstrip("/") != self.url.rstrip("/"):
                raise HTTPException(403, "cross-site request refused")
            body = (await request.body())[: 64 << 10].decode("utf-8", "replace")
            form = {k: v[0] for k, v in parse_qs(body).items()}
            if not session.check_csrf(form.get("csrf")):
                raise HTTPException(403, "missing or wrong CSRF token: reload the page")
            return await handler(request, session, form)

        return action

    async def login(self, request: Request) -> Response:
        user = self.codes.redeem(request.query_params.get("code", ""))
        if user is None:
            self.hub.audit.record("-", "web:login", None, "refused: unknown or used code")
            raise HTTPException(401, "this login URL is unknown, used or expired")
        secret, _session = self.sessions.open(user)
        self.hub.audit.record(user, "web:login", None, "ok")
        response = RedirectResponse("/", status_code=303)  # the code leaves the address bar
        response.set_cookie(SESSION_COOKIE, secret, httponly=True, samesite="strict", path="/")
        return response

    async def logout(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        self.sessions.close(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    def _render(
        self, name: str, session: Session | None, status: int = 200, **context: Any
    ) -> HTMLResponse:
        html = self.templates.get_template(name).render(
            session=session, csrf=session.csrf if session else "", **context
        )
        return HTMLResponse(html, status_code=status)

    async def _error_page(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        return self._render(
            "error.html", session, exc.status_code, title="Error", message=exc.detail, nav=""
        )

    async def _run(self, ref: str) -> AgentRun:
        try:
            return await self.hub.blocking(lambda: resolve_run(self.store, ref))
        except NarrativeError as exc:
            raise HTTPException(404, str(exc)) from None

    def _record(self, session: Session, action: str, target: str | None, outcome: str) -> None:
        self.hub.audit.record(session.user, f"web:{action}", target, outcome)

    def _log_run_action(self, run: AgentRun, action: str, session: Session) -> None:
        """The action in the run's event log: through the driver's log when this hub drives
        the run, directly for a finished run; a run another hub drives is left to that hub,
        the one writer of its log (the audit log has the action either way)."""
        driver = self.hub.drivers.get(run.id)
        if driver is not None:
            events = driver.events
        elif run.status != "running":
            events = RunEventLog(self.store, run.id)
        else:
            return
        events.append("run.requested", action=action, by=f"{session.user} (web view)")

    # -- pages ----------------------------------------------------------------------------------

    async def overview(self, request: Request, session: Session) -> Response:
        objectives = await self.hub.blocking(lambda: views.overview(self.store))
        return self._render(
            "overview.html", session, title="Overview", nav="overview", objectives=objectives
        )

    async def runs(self, request: Request, session: Session) -> Response:
        q = request.query_params
        filters = {
            "status": q.get("status", ""),
            "environment": q.get("environment", ""),
            "text": q.get("q", ""),
        }
        page_no, per = _int(q.get("page"), 1), _int(q.get("per"), 100)
        page = await self.hub.blocking(
            lambda: views.runs_page(self.store, self.hub.manager, page=page_no, per=per, **filters)
        )

        def link(n: int) -> str:
            params = {k: v for k, v in q.items() if k != "page"}
            return "/runs?" + urlencode({**params, "page": n})

        return self._render(
            "runs.html",
            session,
            title="Runs",
            nav="runs",
            page=page,
            filters=filters,
            statuses=views.RUN_STATUSES,
            link=link,
        )

    async def runs_status(self, request: Request, session: Session) -> Response:
        """SSE: the status of each of ``ids`` whenever it changes, until all finished."""
        ids = [i for i in request.query_params.get("ids", "").split(",") if i][:500]

        async def changes() -> AsyncIterator[str]:
            seen: dict[str, str] = {}
            while ids and not self._closing.is_set():
                runs = await self.hub.blocking(lambda: _runs_by_id(self.store, ids))
                for run in runs:
                    if seen.get(run.id) != run.status:
                        seen[run.id] = run.status
                        yield sse("status", _status_of(run))
                if all(r.status != "running" for r in runs) or await request.is_disconnected():
                    return
                yield ": keep-alive\n\n"
                await self._pause(1.0)

        return event_stream(changes())

    async def run(self, request: Request, session: Session) -> Response:
        run = await self._run(request.path_params["run"])
        events = RunEventLog(self.store, run.id)
        start = await asyncio.to_thread(events.tail_offset, _TAIL_BYTES)
        shown, offset = await asyncio.to_thread(events.read_page, start, _TAIL_BYTES)
        panel = await self._panel(run)
        return self._render(
            "run.html",
            session,
            title=f"Run {run.id}",
            nav="runs",
            run=run,
            events=[views.describe_event(e) for e in shown],
            earlier=start > 0,
            offset=offset,
            **panel,
        )

    async def _panel(self, run: AgentRun) -> dict[str, Any]:
        diff = await self.hub.blocking(
            lambda: views.run_diff(self.store, run) if run.status != "running" else None
        )
        usage = await self.hub.blocking(lambda: views.usage_of(self.store, run.id))
        can_merge, why_not = views.mergeable(run)
        return {
            "diff": diff,
            "usage": usage,
            "can_merge": can_merge,
            "why_not": why_not,
            "duration": views.duration_text(views.run_seconds(run)),
        }

    async def run_panel(self, request: Request, session: Session) -> Response:
        run = await self._run(request.path_params["run"])
        return self._render("run_panel.html", session, run=run, **await self._panel(run))

    async def run_events(self, request: Request, session: Session) -> Response:
        """A page of a run's event log from byte ``offset`` on (older events)."""
        run = await self._run(request.path_params["run"])
        offset = _int(request.query_params.get("offset"), 0)
        events, after = await asyncio.to_thread(
            RunEventLog(self.store, run.id).read_page, offset, _PAGE_BYTES
        )
        return self._render(
            "events.html",
            session,
            title=f"Events of {run.id}",
            nav="runs",
            run=run,
            events=[views.describe_event(e) for e in events],
            next_offset=after if after > offset else None,
        )

    async def run_stream(self, request: Request, session: Session) -> Response:
        """SSE: the run's events appended after byte ``offset``, until the run finished."""
        run = await self._run(request.path_params["run"])
        events = RunEventLog(self.store, run.id)
        offset = _int(request.query_params.get("offset"), 0)

        async def appended() -> AsyncIterator[str]:
            nonlocal offset
            idle = 0.0
            if run.status != "running":  # finished before the page asked: nothing will come
                yield sse("finished", {"status": run.status})
                return
            while not self._closing.is_set():
                page, offset = await asyncio.to_thread(events.read_page, offset, _PAGE_BYTES)
                for event in page:
                    yield sse("log", views.describe_event(event))
                    if event.get("type") == "run.finished":
                        yield sse("finished", {"status": event.get("status")})
                        return
                if page:
                    idle = 0.0
                    continue
                if await request.is_disconnected():
                    return
                idle += _POLL
                if idle >= 15:
                    yield ": keep-alive\n\n"
                    idle = 0.0
                await self._pause(_POLL)

        return event_stream(appended())

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def run_stop(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        return await self._control(request, session, "stop")

    async def run_kill(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        return await self._control(request, session, "kill")

    async def _control(self, request: Request, session: Session, action: str) -> Response:
        """Stop or kill a run as ``narrative run stop|kill`` does; the request returns at once
        (a stop may take the run's grace period)."""
        run = await self._run(request.path_params["run"])
        if run.status != "running":
            self._record(session, f"run.{action}", run.id, f"refused: already {run.status}")
            raise HTTPException(409, f"run {run.id} already finished ({run.status})")
        self._record(session, f"run.{action}", run.id, "ok")
        self._log_run_action(run, action, session)
        if run.id in self.hub.drivers:
            work = self.hub.stop_run(run.id) if action == "stop" else self.hub.kill_run(run.id)
        else:
            # driven by another hub of this store, or by none: as the CLI does it, on the
            # store's thread (with no hub alive, a kill records the run in the store)
            def as_the_cli() -> None:
                if action == "stop":
                    asyncio.run(stop_run(self.store, run, None))
                else:
                    asyncio.run(kill_run(self.store, run))

            work = self.hub.blocking(as_the_cli)
        self._spawn(work, f"{action} {run.id}")
        return RedirectResponse(f"/runs/{run.id}", status_code=303)

    def _spawn(self, work: Awaitable[None], what: str) -> None:
        async def guarded() -> None:
            try:
                await work
            except (NarrativeError, OSError) as exc:
                log.warning("web view: %s failed: %s", what, exc)

        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def merge_confirm(self, request: Request, session: Session) -> Response:
        run = await self._run(request.path_params["run"])
        can_merge, why_not = views.mergeable(run)
        diff = await self.hub.blocking(lambda: views.run_diff(self.store, run))
        return self._render(
            "merge.html",
            session,
            title=f"Merge {run.id}",
            nav="runs",
            run=run,
            can_merge=can_merge,
            why_not=why_not,
            diff=diff,
            report=None,
            failed="",
        )

    async def merge(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        """``narrative merge RUN`` (no --allow-failed, no --force), once confirmed."""
        run = await self._run(request.path_params["run"])
        can_merge, why_not = views.mergeable(run)
        if not can_merge:
            self._record(session, "merge", run.id, f"refused: {why_not}")
            raise HTTPException(409, f"run {run.id} cannot be merged: {why_not}")
        if form.get("confirm") != "yes":
            raise HTTPException(400, "the merge was not confirmed")
        report, failed = None, ""
        try:
            result = await self.hub.blocking(lambda: merge_workspace(self.store, run.id))
            report = merge_summary(result.to_dict())
            outcome = "ok" if result.clean else f"ok, {len(result.conflicts)} conflict(s)"
        except NarrativeError as exc:
            failed = str(exc)
            outcome = f"refused: {exc}"
        self._record(session, "merge", run.id, outcome)
        await self.hub.blocking(lambda: self._log_run_action(run, "merge", session))
        return self._render(
            "merge.html",
            session,
            title=f"Merge {run.id}",
            nav="runs",
            run=run,
            can_merge=False,
            why_not="",
            diff=None,
            report=report,
            failed=failed,
        )

    async def environments(self, request: Request, session: Session) -> Response:
        envs = await self.hub.blocking(lambda: views.environments(self.hub.manager))
        return self._render(
            "environments.html", session, title="Environments", nav="environments", envs=envs
        )

    async def environment_logs(self, request: Request, session: Session) -> Response:
        """SSE: the tail of every environment's log whenever it changes (one stream for the
        page: a browser opens only a few connections to one server)."""

        async def tails() -> AsyncIterator[str]:
            shown: dict[str, list[str]] = {}
            while not self._closing.is_set() and not await request.is_disconnected():
                envs = await self.hub.blocking(lambda: views.environments(self.hub.manager))
                for env in envs:
                    name = env["record"].name
                    if shown.get(name) != env["log"]:
                        shown[name] = env["log"]
                        yield sse("log", {"env": name, "lines": env["log"]})
                yield ": keep-alive\n\n"
                await self._pause(2.0)

        return event_stream(tails())

    async def env_action(
        self, request: Request, session: Session, form: dict[str, str]
    ) -> Response:
        """Start, stop or restart an environment, as ``narrative env start|stop|restart``."""
        name, act = request.path_params["env"], request.path_params["act"]
        manager = self.hub.manager
        acts = {"start": manager.start, "stop": manager.stop, "restart": manager.restart}
        if act not in acts:
            raise HTTPException(404, f"no action {act!r}")
        if name in self.hub.private_environments():
            self._record(session, f"env.{act}", name, "refused: a team user's environment")
            raise HTTPException(403, "a team user's private environment")
        try:
            await self.hub.blocking(lambda: acts[act](name))
        except NarrativeError as exc:
            self._record(session, f"env.{act}", name, f"refused: {exc}")
            raise HTTPException(409, str(exc)) from None
        self._record(session, f"env.{act}", name, "ok")
        return RedirectResponse("/environments", status_code=303)

    async def routes(self, request: Request, session: Session) -> Response:
        gateway = self.hub.gateway
        peers = gateway.peers()
        rules = gateway.state.router.config.rules
        return self._render(
            "routes.html",
            session,
            title="Routes",
            nav="routes",
            hub=self.hub.environment_id,
            peers=peers,
            graph=views.topology(self.hub.environment_id, peers),
            rules={k: r.model_dump(exclude_none=True) for k, r in rules.items()},
            hop_limit=gateway.state.router.config.hopLimit,
        )


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def _runs_by_id(store: Any, ids: list[str]) -> list[AgentRun]:
    runs = []
    for run_id in ids:
        with contextlib.suppress(NarrativeError):
            runs.append(get_run(store, run_id))
    return runs


def _status_of(run: AgentRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "status": run.status,
        "exit": run.exit_code,
        "duration": views.duration_text(views.run_seconds(run)),
    }
