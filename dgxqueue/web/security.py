"""The status page's guards: the host it answers to, the access token, CSRF tokens, headers.

- **Loopback by default.** Bound to a loopback address without a token, the page answers only
  requests whose ``Host`` is a loopback name, so a web site that rebinds its own name to
  127.0.0.1 cannot read the page from a browser on this host.
- **A token elsewhere.** With a token (required when bound to any other address), every request
  but the login form and the static files carries it: ``Authorization: Bearer <token>``, or the
  cookie the login form (or ``?token=`` once, then redirected away) sets. The cookie holds an HMAC
  of the token, never the token; the token is never logged (uvicorn's access log is off). An
  address holding ``token`` (``/login?token=`` too, right or wrong) is left by a redirect at once,
  and every login answer is ``Cache-Control: no-store``, so the token stays in no history or cache.
- **CSRF.** Every action is a POST carrying a token (form field ``csrf`` or header
  ``X-CSRF-Token``) that must equal the HMAC, under a secret drawn when the process starts, of a
  random nonce in the cookie ``dgxqueue_csrf`` (``SameSite=Strict``): another site can neither read
  the nonce nor compute the HMAC. (No ``Origin`` check: behind a reverse proxy the ``Host`` the
  page sees is the proxy's upstream, never the origin the browser names.)
- **Headers.** A content security policy that allows only this origin's scripts (none inline),
  so a prompt that slipped through escaping still could not run; no framing; no referrer.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

AUTH_COOKIE = "dgxqueue_web_auth"
CSRF_COOKIE = "dgxqueue_csrf"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
#: Paths served without the token: the login form and the static files (no data in either).
OPEN_PATHS = ("/login", "/static/")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "media-src 'self'; connect-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
#: On every login answer: a page or redirect that saw a token is kept by no cache.
NO_STORE = {"Cache-Control": "no-store"}


def is_loopback(host: str) -> bool:
    """True for a loopback address or ``localhost``."""
    if host.strip("[]") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:8080`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


@dataclass(frozen=True)
class Guard:
    """The guards of one server process."""

    token: str | None
    loopback_only: bool  # answer only Host headers naming loopback (bound to loopback, no token)
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def __repr__(self) -> str:  # never the token
        return f"Guard(token={'set' if self.token else None}, loopback_only={self.loopback_only})"

    def cookie_value(self) -> str:
        assert self.token is not None
        return hmac.new(self.token.encode(), b"dgxqueue-web-session", hashlib.sha256).hexdigest()

    def token_ok(self, given: str | None) -> bool:
        return self.token is not None and given is not None and hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), self.token.encode())

    def authorized(self, request: Request) -> bool:
        if self.token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.token_ok(given.strip()):
            return True
        cookie = request.cookies.get(AUTH_COOKIE)
        return cookie is not None and hmac.compare_digest(cookie.encode(), self.cookie_value().encode())

    def csrf_token(self, nonce: str) -> str:
        return hmac.new(self.secret, nonce.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, request: Request, given: str | None) -> bool:
        nonce = request.cookies.get(CSRF_COOKIE)
        if not nonce or not given:
            return False
        return hmac.compare_digest(given.encode(), self.csrf_token(nonce).encode())

    def login_response(self, request: Request, next_path: str) -> Response:
        response = RedirectResponse(safe_next(next_path), status_code=303, headers=NO_STORE)
        response.set_cookie(AUTH_COOKIE, self.cookie_value(), httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
        return response


def safe_next(path: str | None) -> str:
    """A local path to go back to after an action or a login; anything else is ``/``."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path


def new_csrf_nonce() -> str:
    return secrets.token_urlsafe(24)


class GuardMiddleware:
    """Host and token checks on every request; security headers and the CSRF nonce cookie on
    every response."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        nonce = request.cookies.get(CSRF_COOKIE)
        new_cookie = None if nonce else new_csrf_nonce()
        # Seen by the handlers (their forms carry the token for it); a new one is sent as a cookie.
        scope.setdefault("state", {})["csrf_nonce"] = nonce or new_cookie

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if scope["path"] == "/login":
                    headers.update(NO_STORE)
                if new_cookie is not None:
                    secure = "; Secure" if scope.get("scheme") == "https" else ""
                    headers.append("set-cookie", f"{CSRF_COOKIE}={new_cookie}; Path=/; HttpOnly; "
                                                 f"SameSite=Strict{secure}")
            await send(message)

        refused = self._refusal(request)
        if refused is not None:
            await refused(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def _refusal(self, request: Request) -> Callable[[Scope, Receive, Send], Awaitable[None]] | None:
        guard = self.guard
        if guard.loopback_only and not is_loopback(host_name(request.headers.get("host", ""))):
            return PlainTextResponse("this page answers only loopback host names", status_code=421)
        if guard.token is None:
            return None
        given = request.query_params.get("token")
        if request.url.path == "/login" and given is not None and request.method == "GET":
            # A link that carries the token: out of the address bar, whether it is right or not.
            next_path = safe_next(request.query_params.get("next"))
            if guard.token_ok(given):
                return guard.login_response(request, next_path)
            return RedirectResponse("/login?" + urlencode({"next": next_path}), status_code=303)
        if request.url.path.startswith(OPEN_PATHS):
            return None
        if given is not None and request.method == "GET" and guard.token_ok(given):
            # Into the cookie, and out of the address bar and history.
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
            return guard.login_response(request, target)
        if guard.authorized(request):
            return None
        if request.url.path.startswith("/api/") or request.url.path.startswith("/files/"):
            return JSONResponse({"error": "a token is required (Authorization: Bearer <token>)"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return RedirectResponse("/login?" + urlencode({"next": request.url.path}), status_code=303)


def form_value(form: Any, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None
