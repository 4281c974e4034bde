"""The labelling web app: sign in with a token, rank K responses (ties allowed), skip, flag, write
a better answer; an admin page with progress, throughput and agreement.

Server-rendered HTML (Jinja2 with autoescape: prompts and responses are shown as text, never as
markup) and one small script. Each defence, and why:

- session cookie HttpOnly (no script can read it) and SameSite=Strict (no other site's page
  sends it); sessions live in the database, so a restarted server keeps everyone signed in;
- every POST from a signed-in browser carries its session's CSRF token, and a POST whose Origin
  or Sec-Fetch-Site names another site is refused before its body is read (a page on another
  port of the same machine is "same-site" and would otherwise get the SameSite cookie);
- bodies over ``max_body`` bytes are refused with 413 while streaming, before they are buffered;
- with ``allowed_hosts``, a Host header naming another domain gets 400: a page that points its
  own domain at this machine (DNS rebinding) would otherwise be same-origin with us;
- a Content-Security-Policy that allows only our own script file, so even a rendering bug
  could not run a script that came in with the data.

Tools may call the JSON API with ``Authorization: Bearer TOKEN`` instead of a cookie; browsers
never add that header to cross-site requests, so such calls need no CSRF token.
"""

from __future__ import annotations

import hmac
import json
import uuid
from importlib import resources
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import jinja2
from fastapi import FastAPI, Request
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool  # database calls block: each runs in a thread
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from rlhfkit.label import agreement
from rlhfkit.label.store import (
    MAX_DEMONSTRATION,
    MAX_NOTE,
    THINKING_CAP_SECONDS,
    Conflict,
    InvalidSubmission,
    NotAssigned,
    Principal,
    Store,
    Submission,
    new_token,
)
from rlhfkit.label.tasks import GenerationStatus

MAX_BODY = 64 * 1024
SESSION_COOKIE = "rlhfkit_session"
LOGIN_COOKIE = "rlhfkit_login"  # double-submit token of the sign-in form (login CSRF)
MAX_ID = 2**63 - 1  # SQLite's largest integer: its driver overflows (a 500) on any id past it
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                 b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # Not "no-referrer": with it, browsers send "Origin: null" on our own form posts.
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),  # pages carry CSRF tokens and labelling data
]
BAD_TOKEN = ("That token is not valid. Labellers get a token from the admin "
             "(rlhfkit label add-labeller NAME); the admin token was printed when the server first started.")


class TooDeep(InvalidSubmission):
    """A JSON body nested past the parser's recursion limit (a 400; a submission needs 2 levels)."""


ERROR_STATUS = {InvalidSubmission: 422, TooDeep: 400, NotAssigned: 404, Conflict: 409}


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over the {limit // 1024} KB limit")


class Guard:
    """Plain ASGI middleware: refuse cross-site writes (403) and large bodies (413); add headers."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        headers = Headers(scope=scope)
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and _cross_site(headers):
            refusal = PlainTextResponse("cross-site request refused: submit forms from this site's own pages", 403)
            return await refusal(scope, receive, send_with_headers)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await PlainTextResponse(BodyTooLarge(self.max_body).detail, 413)(scope, receive, send_with_headers)
        seen = 0

        async def receive_limited():  # a chunked body has no Content-Length: count as it arrives
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        await self.app(scope, receive_limited, send_with_headers)


def _same_secret(supplied: Any, expected: str) -> bool:
    """Constant-time comparison; bytes, because compare_digest refuses non-ASCII strings."""
    return isinstance(supplied, str) and hmac.compare_digest(supplied.encode(), expected.encode())


def _cross_site(headers: Headers) -> bool:
    if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        return True
    origin = headers.get("origin")  # absent for non-browser clients; "null" from sandboxes
    return origin is not None and urlsplit(origin).netloc != headers.get("host", "")


class Auth(NamedTuple):
    who: Principal
    csrf: str | None  # None for bearer-token calls: they need none
    session_id: str | None


def create_app(store: Store, generation: GenerationStatus | None = None, max_body: int = MAX_BODY,
               allowed_hosts: list[str] | None = None) -> FastAPI:
    """The web app over ``store``; ``generation`` is the background generation's status, if any.

    ``allowed_hosts``: the Host header names to answer (see rlhfkit.hosts.allowed_hosts); None: any.
    """
    app = FastAPI(title="rlhfkit label", docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_hosts is not None:  # against DNS rebinding; added first, so it runs inside Guard's headers
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    app.add_middleware(Guard, max_body=max_body)
    templates = jinja2.Environment(loader=jinja2.PackageLoader("rlhfkit.label", "templates"), autoescape=True,
                                   undefined=jinja2.StrictUndefined)
    templates.globals.update(fmt=_fmt, pct=_pct, max_demonstration=MAX_DEMONSTRATION, max_note=MAX_NOTE,
                             cap_minutes=THINKING_CAP_SECONDS // 60, who=None, csrf="", error="")
    static = {name: (resources.files("rlhfkit.label").joinpath("static", name).read_text(), kind)
              for name, kind in (("label.js", "text/javascript"), ("style.css", "text/css"))}

    def render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(templates.get_template(name).render(**context), status_code=status)

    def message(text: str, status: int, auth: Auth | None = None, back: str = "/") -> HTMLResponse:
        return render("message.html", status, message=text, back=back, who=auth and auth.who,
                      csrf=auth and auth.csrf or "")

    def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
        response.set_cookie(name, value, max_age=max_age, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")

    async def authenticate(request: Request) -> Auth | None:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            who = await run_in_threadpool(store.authenticate, header[7:].strip())
            return Auth(who, None, None) if who else None
        session_id = request.cookies.get(SESSION_COOKIE)
        found = session_id and await run_in_threadpool(store.session, session_id)
        return Auth(found[0], found[1], session_id) if found else None

    def csrf_ok(auth: Auth, supplied: Any) -> bool:
        return auth.csrf is None or _same_secret(supplied, auth.csrf)

    def generating() -> bool:
        return generation is not None and generation.state in ("waiting", "loading model", "generating")

    # --- pages --------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True}

    @app.get("/static/{name}")
    async def static_file(name: str) -> Response:
        if name not in static:
            return PlainTextResponse("not found", 404)
        text, kind = static[name]
        return Response(text, media_type=kind)

    @app.get("/login")
    async def login_page(request: Request) -> Response:
        return login_form(request)

    def login_form(request: Request, error: str = "", status: int = 200) -> Response:
        login_csrf = new_token()
        response = render("login.html", status, login_csrf=login_csrf, error=error)
        set_cookie(response, request, LOGIN_COOKIE, login_csrf, 3600)
        return response

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        expected, supplied = request.cookies.get(LOGIN_COOKIE, ""), form.get("login_csrf")
        if not (expected and _same_secret(supplied, expected)):
            return login_form(request, "This sign-in form expired; please try again.", 403)
        token = form.get("token")
        who = await run_in_threadpool(store.authenticate, token.strip()) if isinstance(token, str) else None
        if who is None:
            return login_form(request, BAD_TOKEN, 401)
        session_id, _ = await run_in_threadpool(store.open_session, who)
        response = RedirectResponse("/admin" if who.admin else "/", 303)
        set_cookie(response, request, SESSION_COOKIE, session_id, 12 * 3600)
        response.delete_cookie(LOGIN_COOKIE)
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        auth = await authenticate(request)
        form = await request.form()
        if auth is not None and auth.session_id and csrf_ok(auth, form.get("csrf")):
            await run_in_threadpool(store.close_session, auth.session_id)
        response = RedirectResponse("/login", 303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @app.get("/")
    async def label_page(request: Request) -> Response:
        auth = await authenticate(request)
        if auth is None:
            return RedirectResponse("/login", 303)
        if auth.who.admin:
            return RedirectResponse("/admin", 303)
        return await task_page(auth, saved=bool(request.query_params.get("saved")))

    async def task_page(auth: Auth, saved: bool = False, error: str = "", status: int = 200) -> Response:
        task = await run_in_threadpool(store.next_task, auth.who.labeller_id)
        answered = await run_in_threadpool(store.answered, auth.who.labeller_id)
        # A fresh id per rendered form: resending this form (a retry, a double click, the
        # browser's "resubmit?") carries the same id, so the answer is stored once.
        return render("label.html", status, who=auth.who, csrf=auth.csrf, task=task, answered=answered,
                      saved=saved, error=error, generating=generating(), submission_id=uuid.uuid4().hex)

    @app.post("/label")
    async def label_form(request: Request) -> Response:
        auth = await authenticate(request)
        if auth is None:
            return message("Your sign-in has expired; sign in again. Your answer was not saved.", 401, back="/login")
        form = await request.form()
        if not csrf_ok(auth, form.get("csrf")):
            return message("This form is out of date or came from another site; reload the page.", 403, auth)
        if auth.who.admin:
            return message("The admin token cannot label; sign in with a labeller token.", 403, auth, "/admin")
        try:
            await run_in_threadpool(store.submit, auth.who.labeller_id, form_submission(form))
        except InvalidSubmission as e:
            return await task_page(auth, error=str(e), status=422)
        except (NotAssigned, Conflict) as e:
            return message(str(e), ERROR_STATUS[type(e)], auth)
        return RedirectResponse("/?saved=1", 303)

    @app.get("/admin")
    async def admin_page(request: Request) -> Response:
        auth = await authenticate(request)
        if auth is None:
            return RedirectResponse("/login", 303)
        if not auth.who.admin:
            return message("The admin page needs the admin token.", 403, auth)
        stats = await run_in_threadpool(admin_stats, store, generation)
        return render("admin.html", who=auth.who, csrf=auth.csrf, s=stats)

    # --- JSON API (scripts, load tests) ---------------------------------------------------------

    async def api_auth(request: Request, admin: bool = False) -> Auth | JSONResponse:
        auth = await authenticate(request)
        if auth is None:
            return JSONResponse({"detail": "sign in: send 'Authorization: Bearer TOKEN' or a session cookie"}, 401)
        if auth.who.admin != admin:
            return JSONResponse({"detail": "needs the admin token" if admin else "needs a labeller token"}, 403)
        return auth

    @app.get("/api/task")
    async def api_task(request: Request) -> Response:
        auth = await api_auth(request)
        if isinstance(auth, Response):
            return auth
        task = await run_in_threadpool(store.next_task, auth.who.labeller_id)
        if task is None:
            return JSONResponse({"task": None, "generating": generating()})
        return JSONResponse({"task": {"id": task.id, "prompt": [m.to_dict() for m in task.prompt],
                                      "responses": list(task.responses)}})

    @app.post("/api/label")
    async def api_label(request: Request) -> Response:
        auth = await api_auth(request)
        if isinstance(auth, Response):
            return auth
        if not csrf_ok(auth, request.headers.get("x-csrf-token")):
            return JSONResponse({"detail": "missing or wrong X-CSRF-Token header"}, 403)
        try:
            sub = json_submission(await request.body())
            label_id, duplicate = await run_in_threadpool(store.submit, auth.who.labeller_id, sub)
        except (InvalidSubmission, NotAssigned, Conflict) as e:
            return JSONResponse({"detail": str(e)}, ERROR_STATUS[type(e)])
        return JSONResponse({"label_id": label_id, "duplicate": duplicate}, 200 if duplicate else 201)

    @app.get("/api/stats")
    async def api_stats(request: Request) -> Response:
        auth = await api_auth(request, admin=True)
        if isinstance(auth, Response):
            return auth
        return JSONResponse(await run_in_threadpool(admin_stats, store, generation))

    return app


# --- parsing submissions ------------------------------------------------------------------------


def form_submission(form) -> Submission:
    """A Submission from the labelling form: rank_0..rank_{K-1} hold 1-based ranks (1 = best)."""
    values = {key: value for key, value in form.items() if isinstance(value, str)}
    action = values.get("action", "rank")
    ranks = None
    if action == "rank":
        given = []
        while f"rank_{len(given)}" in values:
            given.append(values[f"rank_{len(given)}"])
        if not given or "" in given:
            raise InvalidSubmission("give every response a rank (1 = best; equal numbers for ties)")
        ranks = tuple(_int(r, "rank") for r in given)
    task_id = _id(_int(values.get("task_id", ""), "task_id"), "task_id")
    return Submission(task_id=task_id, submission_id=values.get("submission_id", ""),
                      action=action, ranks=ranks, demonstration=values.get("demonstration", ""),
                      note=values.get("note", ""))


def json_submission(body: bytes) -> Submission:
    """A Submission from ``{task_id, submission_id, action, ranks?, demonstration?, note?}``."""
    try:  # the one place a request's JSON is parsed
        data = json.loads(body)
    except RecursionError:
        raise TooDeep("the JSON body is nested too deeply: a submission is an object holding a list") from None
    except ValueError as e:  # bad JSON or UTF-8, or a number past Python's 4300-digit limit
        raise InvalidSubmission(f"the body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidSubmission("expected a JSON object")
    ranks = data.get("ranks")
    if ranks is not None and not isinstance(ranks, list):
        raise InvalidSubmission("ranks must be a list of whole numbers")
    text = {name: data.get(name, "") for name in ("submission_id", "demonstration", "note")}
    text["action"] = data.get("action", "rank")
    for name, value in text.items():
        if not isinstance(value, str):
            raise InvalidSubmission(f"{name} must be a string")
    task_id = data.get("task_id")
    if not isinstance(task_id, int) or isinstance(task_id, bool):
        raise InvalidSubmission("task_id must be a whole number")
    return Submission(task_id=_id(task_id, "task_id"), ranks=None if ranks is None else tuple(ranks), **text)


def _id(value: int, name: str) -> int:
    """``value`` if it can be a row id: checked here, before the database driver sees it."""
    if not 1 <= value <= MAX_ID:
        raise InvalidSubmission(f"{name} must be a whole number from 1 to {MAX_ID}")
    return value


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidSubmission(f"{name} must be a whole number, got {value!r}") from None


# --- the admin page's numbers -------------------------------------------------------------------


def admin_stats(store: Store, generation: GenerationStatus | None = None) -> dict:
    """Counts, per-labeller throughput and agreement, ready for the admin page or JSON."""
    from datetime import datetime, timezone

    stats = store.stats()
    pairs = agreement.pairwise(stats.pop("rankings"))
    overall = agreement.total(pairs)
    for person in stats["labellers"]:
        mine = agreement.total([p for p in pairs if person["name"] in (p.a, p.b)])
        person.update(agreement=mine.rate, tau=mine.tau, shared_tasks=mine.tasks)
        labels, hours = person["rank"] + person["flag"], person.pop("seconds") / 3600
        person["per_hour"] = labels / hours if hours > 0 else None
        last = person.pop("last")
        person["last_text"] = datetime.fromtimestamp(last, timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if last else ""
    stats["agreement"] = {"rate": overall.rate, "tau": overall.tau, "pairs": overall.pairs, "tasks": overall.tasks}
    stats["pairs"] = [{"a": p.a, "b": p.b, "tasks": p.tasks, "rate": p.rate, "tau": p.tau} for p in pairs]
    stats["generation"] = generation.to_dict() if generation is not None else None
    return stats


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"
