"""The Starlette application: pages, the JSON API under ``/api/``, the actions and the files.

Handlers are plain functions (Starlette runs them on its thread pool), each opening a short
session of its own. Every action is a POST checked by :meth:`Guard.csrf_ok` and refused in
read-only mode; it answers JSON to a client that asks for it (``Accept: application/json``) and
otherwise redirects back to the page the form came from.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import sqlalchemy as sa
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from dgxqueue import __version__, api
from dgxqueue.config import MAX_MODEL_NAME_LENGTH, Settings
from dgxqueue.errors import InvalidStateError, JobNotFoundError, ValidationError
from dgxqueue.jobs import Job
from dgxqueue.storage import admin, retry_generation, session_scope
from dgxqueue.storage.dberrors import database_unavailable
from dgxqueue.web import views
from dgxqueue.web.files import file_response
from dgxqueue.web.security import CSRF_FIELD, CSRF_HEADER, Guard, GuardMiddleware, form_value, safe_next

_log = logging.getLogger(__name__)

#: How often the pages poll the API for live values (milliseconds).
POLL_MS = 1500
_STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class WebOptions:
    """What ``dgxqueue web`` was started with."""

    settings: Settings
    engine: Engine
    read_only: bool = False
    token: str | None = None
    loopback_only: bool = True
    #: The overview is read at most once in this many seconds (or four times as long as its last
    #: read took), whoever asks: each open overview polls it, and its throughput counts read the
    #: last 15 minutes of finished rows. 0: every request reads.
    overview_cache_seconds: float = 1.0

    def __repr__(self) -> str:  # never the token
        return f"WebOptions(read_only={self.read_only}, token={'set' if self.token else None})"


class _Failure(Exception):
    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


async def _action_fields(request: Request) -> dict[str, str]:
    """An action's fields: the form's, or those of a JSON object body (a tool calling the JSON
    API), each a string as a form's would be; a number is written as text."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return {k: v for k, v in (await request.form()).multi_items() if isinstance(v, str)}
    raw = await request.body()
    try:
        # No body at all (a cancel, which takes no fields, sent with this header) is no fields, as
        # it was before JSON was read: not a refusal.
        body = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError):  # not JSON, or not UTF-8
        body = None
    if not isinstance(body, dict):
        raise _Failure(400, 'expected a JSON object such as {"prompt": "lo-fi beat"}, or the fields as a form')
    fields: dict[str, str] = {}
    for key, value in body.items():
        if isinstance(value, str):
            fields[key] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            fields[key] = repr(value)
        elif value is not None:  # null: as if left out
            raise ValidationError(key, value, "text or a number")
    return fields


def create_app(options: WebOptions) -> Starlette:
    """The application for ``options`` (its guard draws a fresh CSRF secret)."""
    guard = Guard(token=options.token, loopback_only=options.loopback_only)
    source = views.Source(options.engine, options.settings.outputs_dir)
    templates = Environment(loader=PackageLoader("dgxqueue.web", "templates"),
                            autoescape=select_autoescape(default=True, default_for_string=True))
    # A job id as one path segment: an id written by plain SQL may hold "?", "#" or "%".
    templates.filters["urlpart"] = lambda value: quote(str(value), safe="")
    templates.globals.update(version=__version__, read_only=options.read_only, poll_ms=POLL_MS,
                             statuses=["pending", "processing", "completed", "failed"], login=guard.token is not None)

    overview_lock = threading.Lock()
    overview_cache: list[tuple[float, dict[str, Any]]] = []  # (until when, the overview)

    def read_overview() -> dict[str, Any]:
        with overview_lock:  # one reader at a time; the others take its result
            started = time.monotonic()
            if overview_cache and started < overview_cache[0][0]:
                return overview_cache[0][1]
            value = views.read_overview(source)
            ended = time.monotonic()
            # A read that grew slow (thousands of jobs finished in the last 15 minutes) is done
            # less often: at most a fifth of the time goes to it, however many pages poll.
            keep = options.overview_cache_seconds and max(options.overview_cache_seconds, 4 * (ended - started))
            overview_cache[:] = [(ended + keep, value)]
            return value

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        nonce = request.state.csrf_nonce
        html = templates.get_template(name).render(request=request, csrf=guard.csrf_token(nonce),
                                                   path=request.url.path, **context)
        return HTMLResponse(html, status_code=status)

    def wants_json(request: Request) -> bool:
        return "application/json" in request.headers.get("accept", "")

    def failure(request: Request, exc: Exception) -> Response:
        status, field = 500, None
        if isinstance(exc, _Failure):
            status, field = exc.status, exc.field
        elif isinstance(exc, ValidationError):
            status, field = 400, exc.field
        elif isinstance(exc, JobNotFoundError):
            status = 404
        elif isinstance(exc, InvalidStateError):
            status = 409
        if request.url.path.startswith("/api/") or wants_json(request):
            return JSONResponse({"error": str(exc), "field": field}, status_code=status)
        return page(request, "error.html", status=status, message=str(exc))

    def handler(function: Callable[[Request], Response]) -> Callable[[Request], Response]:
        def run(request: Request) -> Response:
            try:
                return function(request)
            except (_Failure, ValidationError, JobNotFoundError, InvalidStateError) as exc:
                return failure(request, exc)
        return run

    # --- pages ----------------------------------------------------------------------------

    def overview_page(request: Request) -> Response:
        return page(request, "overview.html", overview=read_overview(),
                    defaults=options.settings.jobs)

    def daemons_page(request: Request) -> Response:
        return page(request, "daemons.html", data=views.read_daemons(source))

    def jobs_page(request: Request) -> Response:
        params = request.query_params
        where = views.parse_filter(params)
        data = views.read_jobs(source, where, views.parse_limit(params.get("limit")), params.get("cursor"))
        next_url = None
        if data["next_cursor"]:
            kept = [(k, v) for k, v in params.multi_items() if k != "cursor"]
            next_url = "/jobs?" + urlencode([*kept, ("cursor", data["next_cursor"])])
        return page(request, "jobs.html", data=data, params=params, next_url=next_url,
                    first_url="/jobs?" + urlencode([(k, v) for k, v in params.multi_items() if k != "cursor"]))

    def job_page(request: Request) -> Response:
        return page(request, "job.html", job=views.read_job(source, request.path_params["job_id"]))

    def login_page(request: Request) -> Response:
        return page(request, "login.html", next=safe_next(request.query_params.get("next")), failed=False)

    async def login_post(request: Request) -> Response:
        form = await request.form()
        next_path = safe_next(form_value(form, "next"))
        if guard.token is not None and guard.token_ok(form_value(form, "token")):
            return guard.login_response(request, next_path)
        return page(request, "login.html", status=401, next=next_path, failed=guard.token is not None)

    def files(request: Request) -> Response:
        relative = request.path_params["path"]
        # Not the file at a completed job's path when it is not that job's WAV (its result held
        # under its temporary name, another's file there): 404, as for its missing file, saying why.
        refused = views.refusal(source, relative)
        if refused is not None:
            return failure(request, _Failure(404, refused))
        return file_response(request, source.outputs_dir, relative,
                             download=request.query_params.get("download") == "1")

    # --- JSON API -------------------------------------------------------------------------

    def api_overview(request: Request) -> Response:
        return JSONResponse(read_overview())

    def api_daemons(request: Request) -> Response:
        return JSONResponse(views.read_daemons(source))

    def api_jobs(request: Request) -> Response:
        params = request.query_params
        return JSONResponse(views.read_jobs(source, views.parse_filter(params), views.parse_limit(params.get("limit")),
                                            params.get("cursor")))

    def api_job(request: Request) -> Response:
        return JSONResponse(views.read_job(source, request.path_params["job_id"]))

    # --- actions --------------------------------------------------------------------------

    def action(function: Callable[[Request, dict[str, str]], tuple[dict[str, Any], str]]) -> Callable[..., Any]:
        """A POST: read-only refusal, CSRF check, then ``function``, which returns its JSON and
        the page to go back to."""
        async def run(request: Request) -> Response:
            form: dict[str, str] = {}
            try:
                form = await _action_fields(request)
                if options.read_only:
                    raise _Failure(403, "read-only mode: actions are disabled")
                if not guard.csrf_ok(request, request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)):
                    raise _Failure(403, "missing or wrong CSRF token: reload the page and try again")
                result, back = await run_in_threadpool(function, request, form)
            except (_Failure, ValidationError, JobNotFoundError, InvalidStateError) as exc:
                return failure(request, exc)
            if wants_json(request):
                return JSONResponse(result)
            return RedirectResponse(safe_next(form.get("next") or back), status_code=303)
        return run

    def job_id_of(request: Request) -> str:
        job_id: str = request.path_params["job_id"]
        if "\x00" in job_id:  # no row holds one, and PostgreSQL refuses to compare it
            raise JobNotFoundError(job_id)
        return job_id

    def cancel(request: Request, form: dict[str, str]) -> tuple[dict[str, Any], str]:
        job_id = job_id_of(request)
        # The handle's cancel: a pending job claimed meanwhile is asked to stop instead.
        status = Job(job_id, options.engine, options.settings).cancel()
        return {"id": job_id, "status": status}, f"/jobs/{quote(job_id, safe='')}"

    def retry(request: Request, form: dict[str, str]) -> tuple[dict[str, Any], str]:
        job_id = job_id_of(request)
        with session_scope(options.engine) as session:
            status = retry_generation(session, job_id).status
        return {"id": job_id, "status": status}, f"/jobs/{quote(job_id, safe='')}"

    def model_name(form: dict[str, str]) -> str:
        model = (form.get("model") or "").strip()
        # The limits an enqueued model name has (PostgreSQL refuses a NUL: a 500 otherwise).
        if not model or "\x00" in model or len(model) > MAX_MODEL_NAME_LENGTH:
            raise ValidationError("model", form.get("model"),
                                  f"a model name of 1 to {MAX_MODEL_NAME_LENGTH} characters without NUL bytes")
        return model

    def reason_of(form: dict[str, str]) -> str | None:
        reason = (form.get("reason") or "").strip()
        if "\x00" in reason:
            raise ValidationError("reason", reason, "text without NUL bytes")
        return reason or None

    def pause(request: Request, form: dict[str, str]) -> tuple[dict[str, Any], str]:
        model, reason = model_name(form), reason_of(form)
        with session_scope(options.engine) as session:
            added = admin.pause_model(session, model, reason)
        return {"model": model, "paused": True, "already_paused": not added}, "/"

    def resume(request: Request, form: dict[str, str]) -> tuple[dict[str, Any], str]:
        model = model_name(form)
        with session_scope(options.engine) as session:
            removed = admin.resume_model(session, model)
        return {"model": model, "paused": False, "was_paused": removed}, "/"

    def enqueue(request: Request, form: dict[str, str]) -> tuple[dict[str, Any], str]:
        duration = (form.get("duration_seconds") or "").strip()
        try:
            seconds = float(duration) if duration else None
        except ValueError:
            raise ValidationError("duration_seconds", duration, "a number of seconds") from None
        try:
            job_id = api.enqueue(form.get("prompt", ""), model_name=(form.get("model") or "").strip() or None,
                                 duration_seconds=seconds, settings=options.settings)
        except ValidationError as exc:
            if exc.field != "model_name":
                raise
            # The form's field is "model": the refusal names what the user typed into.
            raise ValidationError("model", exc.value, exc.allowed) from None
        return {"id": job_id, "status": "pending"}, f"/jobs/{quote(job_id, safe='')}"

    # ":path": a job id written by plain SQL may hold "/", which arrives decoded from its "%2F";
    # the action routes still match, their suffix being fixed.
    routes = [
        Route("/", handler(overview_page)),
        Route("/daemons", handler(daemons_page)),
        Route("/jobs", handler(jobs_page)),
        Route("/jobs/{job_id:path}", handler(job_page)),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login_post, methods=["POST"]),
        Route("/files/{path:path}", files, methods=["GET", "HEAD"]),
        Route("/api/overview", handler(api_overview)),
        Route("/api/daemons", handler(api_daemons)),
        Route("/api/jobs", handler(api_jobs), methods=["GET"]),
        Route("/api/jobs", action(enqueue), methods=["POST"]),
        Route("/api/jobs/{job_id:path}", handler(api_job)),
        Route("/api/jobs/{job_id:path}/cancel", action(cancel), methods=["POST"]),
        Route("/api/jobs/{job_id:path}/retry", action(retry), methods=["POST"]),
        Route("/api/models/pause", action(pause), methods=["POST"]),
        Route("/api/models/resume", action(resume), methods=["POST"]),
        Mount("/static", StaticFiles(directory=_STATIC), name="static"),
    ]
    async def database_error(request: Request, exc: Exception) -> Response:
        # One line, without the statement: the page may be shown to people who should not read SQL.
        assert isinstance(exc, sa.exc.DBAPIError)
        status = 503 if database_unavailable(exc) else 500
        message = f"database {'unavailable' if status == 503 else 'error'}: {type(exc.orig).__name__}"
        if status == 500:  # the page names only the error's kind: the log is where its cause is read
            _log.error("%s on %r: %r", message, request.url.path, str(exc.orig).strip())
        if request.url.path.startswith("/api/") or wants_json(request):
            return JSONResponse({"error": message, "field": None}, status_code=status)
        return page(request, "error.html", status=status, message=message)

    async def pool_exhausted(request: Request, exc: Exception) -> Response:
        # Every connection busy (reads waiting on a slow database): unavailable, as a lost one is.
        message = "database unavailable: no free connection (TimeoutError)"
        if request.url.path.startswith("/api/") or wants_json(request):
            return JSONResponse({"error": message, "field": None}, status_code=503)
        return page(request, "error.html", status=503, message=message)

    app = Starlette(routes=routes, exception_handlers={sa.exc.DBAPIError: database_error,
                                                       sa.exc.TimeoutError: pool_exhausted})
    app.add_middleware(GuardMiddleware, guard=guard)
    return app
