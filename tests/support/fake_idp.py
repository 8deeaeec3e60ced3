"""A scriptable token endpoint for httpx.MockTransport.

Only for what a real server will not do on demand (429 with Retry-After, 503, an
HTML error page, a response lost after the server processed the request) and for
counting requests exactly in single-flight tests. Everything a real server *can*
do is tested against django-oauth-toolkit in ``tests/integration``.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

import httpx

TOKEN_URL = "https://idp.test/oauth2/token"

Script = Callable[[httpx.Request, dict[str, str]], httpx.Response | None]


@dataclass
class FakeIdP:
    """Issues ``access-N`` / ``refresh-N`` tokens; rotates refresh tokens; counts requests.

    ``script`` entries are consumed one per request before the default behaviour:
    each may return a response, raise an httpx exception, or return None to fall
    through to the default (useful to "process then lose the response").
    """

    lifetime: int = 3600
    rotate: bool = True
    issue_refresh: bool = True
    script: list[Script] = field(default_factory=list)
    requests: list[dict[str, str]] = field(default_factory=list)
    headers: list[httpx.Headers] = field(default_factory=list)
    valid_refresh: set[str] = field(default_factory=set)
    delay: float = 0.0
    _counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl(request.content.decode()))
        with self._lock:
            self.requests.append(form)
            self.headers.append(request.headers)
            scripted = self.script.pop(0) if self.script else None
        if self.delay:
            threading.Event().wait(self.delay)
        if scripted is not None:
            response = scripted(request, form)
            if response is not None:
                return response
        return self.issue(form)

    def issue(self, form: dict[str, str]) -> httpx.Response:
        with self._lock:
            if form.get("grant_type") == "refresh_token":
                token = form.get("refresh_token", "")
                if token not in self.valid_refresh:
                    return oauth_error(400, "invalid_grant", "refresh token is invalid")
                if self.rotate:
                    self.valid_refresh.discard(token)
            n = next(self._counter)
            body: dict[str, object] = {
                "access_token": f"access-{n}",
                "token_type": "bearer",
                "expires_in": self.lifetime,
            }
            if self.issue_refresh and (self.rotate or form.get("grant_type") != "refresh_token"):
                body["refresh_token"] = f"refresh-{n}"
                self.valid_refresh.add(f"refresh-{n}")
        return httpx.Response(200, json=body)

    def grants(self, grant_type: str | None = None) -> list[dict[str, str]]:
        return [r for r in self.requests if grant_type is None or r.get("grant_type") == grant_type]

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def oauth_error(status: int, error: str, description: str | None = None, **headers: str) -> httpx.Response:
    body = {"error": error}
    if description is not None:
        body["error_description"] = description
    return httpx.Response(status, content=json.dumps(body), headers={"content-type": "application/json", **headers})


def process_then_lose(idp: FakeIdP) -> Script:
    """The server handles the request (rotating the token) but the answer never arrives."""

    def step(request: httpx.Request, form: dict[str, str]) -> httpx.Response | None:
        idp.issue(form)
        raise httpx.ReadTimeout("timed out", request=request)

    return step


def refuse_connection(request: httpx.Request, form: dict[str, str]) -> httpx.Response | None:
    raise httpx.ConnectError("connection refused", request=request)


def respond(response: httpx.Response) -> Script:
    return lambda request, form: response
