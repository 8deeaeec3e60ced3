"""Fault-injection tools for tests/faults: what breaks, and what counts as harm.

* :class:`FaultProxy`: an HTTP proxy in front of the real IdP, on a free loopback port,
  with switchable faults (5xx / 429 with headers, garbage bodies, connection resets,
  lost responses: the IdP processed the request but the reply never arrives). It
  timestamps every request, counts refresh tokens forwarded more than once, and
  registers every token it sees with the leak detector.
* :class:`SecretSampler`: reads target Secrets every ~150 ms, as a pod would, and
  counts samples where a Secret held an expired token (expiry from IdP introspection,
  taken once per token) outside an explicitly allowed tolerance.
* :class:`OperatorProcesses`: the unmodified operator as separate processes (forked
  from ``tests/faults/operator_process.py``), to SIGKILL and restart.
* :class:`Counts`: the per-scenario figures the fault suite prints at the end.
* :func:`scan_for_leaks`: known secret values in operator logs, Events, CR status.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from support import leaks

__all__ = [
    "RT_ONLY_CLIENT",
    "Counts",
    "FaultProxy",
    "KillSwitch",
    "OperatorProcesses",
    "ProxiedRequest",
    "SecretSampler",
    "bootstrap_refresh_token",
    "cc_spec",
    "counting",
    "credential_world",
    "hostile_specs",
    "merge_patch",
    "request_refresh",
    "rotations_stored",
    "scan_for_leaks",
    "stored_tokens",
    "tally_harm",
    "valid_token_problems",
]

OPERATOR_SCRIPT = Path(__file__).resolve().parents[1] / "faults" / "operator_process.py"


# -- what a scenario reports ---------------------------------------------------------------


@dataclass
class Counts:
    """One scenario's figures. Everything but ``faults`` must end at 0."""

    scenario: str
    faults: int = 0
    lost: int = 0
    expired: int = 0
    spent_twice: int = 0
    leaked: int = 0
    seconds: float = 0.0
    details: list[str] = field(default_factory=list)
    #: Failed expectations about user-visible behaviour other than the counts.
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.scenario:<48} faults injected {self.faults:>4}  credentials lost {self.lost}  "
            f"expired tokens served {self.expired}  refresh tokens spent twice {self.spent_twice}  "
            f"secrets leaked {self.leaked}  ({self.seconds:.0f} s)"
        )

    def check(self, ok: bool, message: str) -> bool:
        """Record a failed expectation (asserted by :meth:`assert_clean`), keep going."""
        if not ok:
            self.failures.append(message)
        return ok

    def assert_clean(self) -> None:
        problems = [
            f"{name} = {value}"
            for name, value in (
                ("credentials lost", self.lost),
                ("expired tokens served", self.expired),
                ("refresh tokens spent twice", self.spent_twice),
                ("secrets leaked", self.leaked),
            )
            if value
        ]
        assert self.faults > 0, f"{self.scenario}: no fault was injected, so nothing was tested"
        assert not problems and not self.failures, (
            f"{self.scenario}: " + "; ".join(problems + self.failures) + "\ndetails:\n  " + "\n  ".join(self.details)
        )


# -- the fault-injecting proxy -------------------------------------------------------------

PASS = "pass"
STATUS = "status"  # answer with a status code, headers and body of the test's choice
GARBAGE = "garbage"  # 200 with a body that is not a token response
RESET = "reset"  # read the request, then reset the connection (TCP RST)
LOSE = "lose"  # forward, let the IdP answer, then reset: the response is lost
MODES = (PASS, STATUS, GARBAGE, RESET, LOSE)


@dataclass
class ProxiedRequest:
    at: float
    method: str
    path: str
    client_id: str
    grant_type: str
    form: dict[str, str] = field(repr=False)
    fault: str | None = None
    status: int | None = None  # what the operator received; None: a reset
    forwarded: bool = False  # the IdP saw it
    done_at: float | None = None
    #: When the proxy began writing its own (fault) answer: no later than the operator heard it.
    answered_at: float | None = None
    #: The refresh token in the IdP's answer, once the operator was sent that answer.
    delivered_refresh_token: str | None = field(default=None, repr=False)


@dataclass
class _Fault:
    mode: str
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    match: Callable[[ProxiedRequest], bool] | None = None
    limit: int | None = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    proxy: FaultProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # resets are the point; a failed write to a reset socket is not news


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.server.proxy._serve(self)

    def do_GET(self) -> None:
        self.server.proxy._serve(self)


def _client_id(headers: Any, form: dict[str, str]) -> str:
    scheme, _, credentials = str(headers.get("Authorization", "")).partition(" ")
    if scheme == "Basic":
        with contextlib.suppress(ValueError):
            return base64.b64decode(credentials).decode().partition(":")[0]
    return form.get("client_id", "")


def _sender_gone(handler: BaseHTTPRequestHandler) -> bool:
    """The client closed its end (an HTTP client never half-closes while waiting: it died)."""
    try:
        return handler.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset


def _reset(handler: BaseHTTPRequestHandler) -> None:
    """Close with SO_LINGER 0: the peer sees a connection reset, not a clean close."""
    handler.close_connection = True
    with contextlib.suppress(OSError):
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.connection.close()


class FaultProxy:
    """``http://127.0.0.1:PORT`` forwarding to ``upstream`` unless a fault is set.

    ``set_fault(mode, ...)`` applies to requests that ``match`` (default: token
    requests), at most ``limit`` times, then the proxy passes again. Hooks:
    ``on_request(record)`` runs when a request arrives (before the fault; a true result
    drops the request: a reset, the IdP never sees it), and
    ``on_response(record)`` after the IdP answered and before the operator hears.

    ``kill_if(check, kill)`` makes a kill atomic with respect to requests: no request is
    admitted (recorded as in flight) while ``check`` and ``kill`` run, and afterwards a
    request that matches ``fence`` and whose sender has died (its connection is closed
    before the proxy got to it: written by the killed process, still in the socket
    buffers) is dropped, never forwarded. So "nothing of that kind in flight" checked
    in ``check`` stays true through the kill.
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.requests: list[ProxiedRequest] = []
        self.faults = 0
        #: Requests the proxy had to reset because the IdP did not accept the connection.
        self.upstream_failures = 0
        self.faults_by_mode: Counter[str] = Counter()
        self.refresh_tokens_forwarded: Counter[str] = Counter()
        self.on_request: Callable[[ProxiedRequest], bool] | None = None
        self.on_response: Callable[[ProxiedRequest], None] | None = None
        self.fence: Callable[[ProxiedRequest], bool] | None = None
        #: Fenced requests dropped because their sender had died.
        self.fenced_out = 0
        self._fault = _Fault(PASS)
        self._lock = threading.RLock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def token_url(self) -> str:
        return f"{self.url}/o/token/"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- faults ---------------------------------------------------------------------------
    def set_fault(
        self,
        mode: str,
        *,
        status: int = 503,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        match: Callable[[ProxiedRequest], bool] | None = None,
        limit: int | None = None,
    ) -> None:
        assert mode in MODES, mode
        with self._lock:
            self._fault = _Fault(mode, status, dict(headers or {}), body, match, limit)

    def passthrough(self) -> None:
        self.set_fault(PASS)

    def _take(self, record: ProxiedRequest) -> _Fault | None:
        with self._lock:
            fault = self._fault
            if fault.mode == PASS or not record.path.endswith("/token/"):
                return None
            if fault.match is not None and not fault.match(record):
                return None
            if fault.limit is not None:
                if fault.limit <= 0:
                    return None
                fault.limit -= 1
            self.faults += 1
            self.faults_by_mode[fault.mode] += 1
            record.fault = fault.mode
            return fault

    # -- figures ----------------------------------------------------------------------------
    def token_requests(self, client_id: str | None = None, since: float = 0.0) -> list[ProxiedRequest]:
        with self._lock:
            return [
                r
                for r in self.requests
                if r.path.endswith("/token/") and r.at >= since and (client_id is None or r.client_id == client_id)
            ]

    def in_flight(self, client_id: str) -> bool:
        with self._lock:
            return any(r.client_id == client_id and r.done_at is None for r in self.requests)

    def last_done(self, client_id: str) -> float:
        with self._lock:
            return max((r.done_at or 0.0 for r in self.requests if r.client_id == client_id), default=0.0)

    def live_refresh_tokens(self, client_id: str) -> set[str]:
        """Refresh tokens the operator was sent for ``client_id`` and has not presented since.

        Each is the only copy of a credential's chain: until the operator stored it, a
        kill loses that chain.
        """
        with self._lock:
            delivered = {r.delivered_refresh_token for r in self.requests if r.client_id == client_id}
            presented = {r.form.get("refresh_token") for r in self.requests if r.forwarded}
            return {t for t in delivered - presented if t}

    def kill_if(self, check: Callable[[], bool], kill: Callable[[], None]) -> bool:
        """``kill()`` if ``check()``, with no request admitted in between (see the class)."""
        with self._lock:
            if not check():
                return False
            kill()
            return True

    def reuse_report(self) -> list[str]:
        """For each refresh token forwarded more than once: client and times of each send."""
        with self._lock:
            sends: dict[str, list[ProxiedRequest]] = {}
            for r in self.requests:
                token = r.form.get("refresh_token")
                if r.forwarded and token and self.refresh_tokens_forwarded[token] > 1:
                    sends.setdefault(token, []).append(r)
        return [
            f"{rs[0].client_id} sent one refresh token {len(rs)} times, at "
            + ", ".join(time.strftime("%H:%M:%S", time.localtime(r.at)) + f".{int(r.at * 1000) % 1000:03d}" for r in rs)
            for rs in sends.values()
        ]

    @property
    def refresh_tokens_spent_twice(self) -> int:
        """Refresh tokens the IdP was sent more than once (each extra send counts)."""
        with self._lock:
            return sum(n - 1 for n in self.refresh_tokens_forwarded.values() if n > 1)

    # -- serving ----------------------------------------------------------------------------
    def _serve(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        form = dict(parse_qsl(body.decode(errors="replace"))) if body else {}
        leaks.register(*(form.get(k) for k in ("refresh_token", "password", "client_secret")))
        record = ProxiedRequest(
            at=time.time(),
            method=handler.command,
            path=handler.path.split("?", 1)[0],
            client_id=_client_id(handler.headers, form),
            grant_type=form.get("grant_type", ""),
            form=form,
        )
        with self._lock:
            if self.fence is not None and self.fence(record) and _sender_gone(handler):
                record.done_at = record.at
                self.fenced_out += 1
                _reset(handler)  # died with its sender: the IdP never sees it
                return
            self.requests.append(record)
        try:
            if self.on_request is not None and self.on_request(record):
                _reset(handler)  # the hook dropped it: the IdP never sees this request
                return
            fault = self._take(record)
            if fault is not None and fault.mode == RESET:
                _reset(handler)
                return
            if fault is not None and fault.mode in (STATUS, GARBAGE):
                status = fault.status if fault.mode == STATUS else 200
                payload = fault.body or (b"<html>upstream exploded" if fault.mode == GARBAGE else b"")
                content_type = "application/json" if fault.mode == GARBAGE else "text/plain"
                record.answered_at = time.time()
                self._respond(handler, status, {"Content-Type": content_type, **fault.headers}, payload)
                record.status = status
                return
            try:
                status, headers, payload = self._forward(handler, record, body)
            except OSError:
                with self._lock:
                    self.upstream_failures += 1
                _reset(handler)  # the IdP is down: so is the proxy, as a load balancer would be
                return
            self._register_tokens(payload)
            if self.on_response is not None:
                self.on_response(record)
            if fault is not None and fault.mode == LOSE:
                _reset(handler)
                return
            self._respond(handler, status, headers, payload)
            record.status = status
            if status == 200:
                with contextlib.suppress(ValueError, AttributeError, TypeError):
                    record.delivered_refresh_token = json.loads(payload).get("refresh_token")
        finally:
            record.done_at = time.time()

    def _forward(self, handler: _Handler, record: ProxiedRequest, body: bytes) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=30)
        try:
            skip = {"host", "connection", "keep-alive", "content-length", "transfer-encoding"}
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in skip}
            connection.request(handler.command, handler.path, body=body, headers=headers)
            token = record.form.get("refresh_token")
            if record.grant_type == "refresh_token" and token:
                with self._lock:
                    self.refresh_tokens_forwarded[token] += 1
            record.forwarded = True
            response = connection.getresponse()
            payload = response.read()
            keep = {"content-type", "cache-control", "pragma", "retry-after", "www-authenticate"}
            return response.status, {k: v for k, v in response.getheaders() if k.lower() in keep}, payload
        finally:
            connection.close()

    @staticmethod
    def _respond(handler: _Handler, status: int, headers: dict[str, str], payload: bytes) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    @staticmethod
    def _register_tokens(payload: bytes) -> None:
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            document = json.loads(payload)
            leaks.register(*(document.get(k) for k in ("access_token", "refresh_token", "id_token")))


# -- what pods see ----------------------------------------------------------------------


@dataclass
class _Token:
    expires: float
    first_seen: float
    source: str
    note: str = ""


class SecretSampler:
    """Reads ``(api_url, namespace, name)`` Secrets every ``interval`` s from a thread.

    Each access token's expiry comes from IdP introspection (``exp``, an integer
    second, so +1 s) the first time it is seen; a token that is already inactive
    then counts as expired from that moment; if the IdP cannot be asked, the
    ``expires_at`` the operator wrote (rounded down, so +1 s) is used.
    A sample is *expired* when its token's expiry has passed and ``tolerated(t)`` is
    false for the sample time t (default: never tolerated).
    """

    def __init__(
        self,
        secrets: Iterable[tuple[str, str, str]],
        *,
        introspect: Callable[[str], dict[str, Any]] | None = None,
        tolerated: Callable[[float], bool] | None = None,
        interval: float = 0.15,
    ) -> None:
        self.secrets = list(secrets)
        self.introspect = introspect
        self.tolerated = tolerated or (lambda t: False)
        self.interval = interval
        self.samples = 0
        self.expired_samples = 0
        self.tolerated_samples = 0
        self.violations: list[str] = []
        self.tokens: dict[str, _Token] = {}
        self.current: dict[tuple[str, str, str], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="secret-sampler", daemon=True)

    def __enter__(self) -> SecretSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def distinct_tokens(self, source: tuple[str, str, str] | None = None) -> int:
        return sum(1 for t in self.tokens.values() if source is None or t.source == "/".join(source))

    def _run(self) -> None:
        # One list per namespace and round: a loaded API server answers one request faster than many.
        namespaces = sorted({(url, namespace) for url, namespace, _ in self.secrets})
        while not self._stop.wait(self.interval):
            for url, namespace in namespaces:
                with contextlib.suppress(Exception):
                    with urllib.request.urlopen(f"{url}/api/v1/namespaces/{namespace}/secrets", timeout=5) as response:
                        items = {item["metadata"]["name"]: item for item in json.load(response).get("items") or []}
                    for source in self.secrets:
                        if source[:2] == (url, namespace) and source[2] in items:
                            self._sample(source, items[source[2]])

    def _sample(self, source: tuple[str, str, str], body: dict[str, Any]) -> None:
        _, namespace, name = source
        now = time.time()
        data = {k: base64.b64decode(v).decode() for k, v in (body.get("data") or {}).items()}
        token = data.get("access_token")
        if not token:
            return
        self.current[source] = token
        self.samples += 1
        known = self.tokens.get(token)
        if known is None:
            leaks.register(token)
            expires, note = self._expiry(token, data, now, source)
            known = self.tokens[token] = _Token(expires, now, "/".join(source), note)
        if known.expires <= now:
            if self.tolerated(now):
                self.tolerated_samples += 1
            else:
                self.expired_samples += 1
                if len(self.violations) < 20:
                    self.violations.append(
                        f"{namespace}/{name} held a token expired {now - known.expires:.1f} s ago at {time.strftime('%H:%M:%S', time.localtime(now))}{known.note}"
                    )

    def _expiry(self, token: str, data: dict[str, str], now: float, source: tuple[str, str, str]) -> tuple[float, str]:
        if self.introspect is not None:
            try:
                answer = self.introspect(token)
            except Exception:
                answer = None
            if answer is not None:
                if answer.get("active") and "exp" in answer:
                    return float(answer["exp"]) + 1.0, ""
                if self._replaced(source, token):
                    # Renewed between our read and the introspection: the IdP revokes the old
                    # access token on refresh. Judge it by the expiry it was published with.
                    return self._written_expiry(data), " (replaced and revoked right after it was read)"
                return now, " (inactive when first seen: revoked, or expired)"
        return self._written_expiry(data), ""

    @staticmethod
    def _written_expiry(data: dict[str, str]) -> float:
        stamp = data.get("expires_at")
        if stamp:
            return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone + 1.0
        return float("inf")

    @staticmethod
    def _replaced(source: tuple[str, str, str], token: str) -> bool:
        url, namespace, name = source
        try:
            with urllib.request.urlopen(f"{url}/api/v1/namespaces/{namespace}/secrets/{name}", timeout=5) as response:
                data = json.load(response).get("data") or {}
        except Exception:
            return False
        current = base64.b64decode(data.get("access_token") or "").decode()
        return bool(current) and current != token


# -- the operator as processes ----------------------------------------------------------


class OperatorProcesses:
    """Forks operator processes from one pre-imported zygote (see operator_process.py)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.logs: list[Path] = []
        self._zygote = subprocess.Popen(
            [sys.executable, str(OPERATOR_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(directory / "zygote.log", "ab"),  # noqa: SIM115  (closed with the process)
            text=True,
            bufsize=1,
        )
        assert self._zygote.stdout is not None
        ready = self._zygote.stdout.readline()
        assert ready.strip() == '{"ready": true}', f"the operator zygote did not start: {ready!r}"

    def spawn(self, server_url: str, settings: dict[str, Any], log_name: str) -> int:
        assert self._zygote.stdin is not None and self._zygote.stdout is not None
        log = self.directory / log_name
        if log not in self.logs:
            self.logs.append(log)
        self._zygote.stdin.write(json.dumps({"log": str(log), "server_url": server_url, "settings": settings}) + "\n")
        self._zygote.stdin.flush()
        return int(json.loads(self._zygote.stdout.readline())["pid"])

    @staticmethod
    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # A zombie still answers signal 0; the zygote ignores SIGCHLD, so there are none.
        return True

    @staticmethod
    def kill(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while OperatorProcesses.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.005)

    @staticmethod
    def terminate(pid: int, timeout: float = 10.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while OperatorProcesses.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        OperatorProcesses.kill(pid)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def close(self) -> None:
        if self._zygote.stdin is not None:
            with contextlib.suppress(OSError):
                self._zygote.stdin.close()
        try:
            self._zygote.wait(10)
        except subprocess.TimeoutExpired:
            self._zygote.kill()
            self._zygote.wait()


@contextlib.contextmanager
def operator_processes(directory: Path) -> Iterator[OperatorProcesses]:
    processes = OperatorProcesses(directory)
    try:
        yield processes
    finally:
        processes.close()


# -- cluster helpers ----------------------------------------------------------------------


def merge_patch(api_url: str, path: str, patch: dict[str, Any]) -> None:
    """A JSON merge patch on a raw API path (no resourceVersion: never a conflict)."""
    request = urllib.request.Request(
        api_url + path,
        data=json.dumps(patch).encode(),
        method="PATCH",
        headers={"Content-Type": "application/merge-patch+json"},
    )
    with urllib.request.urlopen(request, timeout=10):
        pass


def request_refresh(api_url: str, namespace: str, name: str, stamp: str) -> None:
    """``kubectl annotate ... tokensync.dev/refresh-requested-at=STAMP --overwrite``."""
    merge_patch(
        api_url,
        f"/apis/tokensync.dev/v1alpha1/namespaces/{namespace}/oauthcredentials/{name}",
        {"metadata": {"annotations": {"tokensync.dev/refresh-requested-at": stamp}}},
    )


def stored_tokens(api_url: str, namespace: str, tokens: set[str]) -> set[str]:
    """Which of ``tokens`` some Secret of ``namespace`` holds (in any data value)."""
    with urllib.request.urlopen(f"{api_url}/api/v1/namespaces/{namespace}/secrets", timeout=10) as response:
        items = json.load(response).get("items") or []
    found: set[str] = set()
    for item in items:
        for value in (item.get("data") or {}).values():
            with contextlib.suppress(ValueError, TypeError):
                text = base64.b64decode(value).decode(errors="replace")
                found |= {t for t in tokens if t in text}
    return found


def scan_for_leaks(texts: dict[str, str]) -> list[str]:
    """Known secrets in each named text (an operator log, a status dump): descriptions."""
    return [f"{where} contains {hit}" for where, text in texts.items() for hit in sorted(set(leaks.find(text)))]


# -- a world of credentials: one per grant, rotating refresh tokens --------------------------

#: The client of refresh_token-only credentials (bootstrap token from a one-off login);
#: password credentials use ``public-client`` and client_credentials ``cc-client``, so the
#: proxy can tell the three apart by client id.
RT_ONLY_CLIENT = "pw-client"
PASSWORD_CLIENT = "public-client"
CC_CLIENT = "cc-client"


def bootstrap_refresh_token(idp: Any) -> str:
    """A fresh refresh token of ``pw-client`` for alice, as a human's one-off login gets it."""
    import httpx

    response = httpx.post(
        idp.token_url,
        data={"grant_type": "password", "username": "alice", "password": idp.password("alice")},
        auth=(RT_ONLY_CLIENT, idp.client_secret(RT_ONLY_CLIENT)),
        timeout=10,
    )
    response.raise_for_status()
    token = str(response.json()["refresh_token"])
    leaks.register(token)
    return token


def credential_world(
    cluster: Any,
    idp: Any,
    token_url: str,
    *,
    cc: int = 1,
    password: int = 1,
    refresh_token: int = 1,
    refresh: dict[str, Any] | None = None,
    store: dict[str, Any] | None = None,
    prefix: str = "",
    bootstraps: dict[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Source Secrets in ``cluster`` and the specs of ``cc`` client_credentials, ``password``
    (rotating refresh token) and ``refresh_token``-only credentials, by name.

    ``bootstraps`` (name -> token) reuses bootstrap refresh tokens instead of minting new ones.
    """
    cluster.apply_secret("cc-src", {"secret": idp.client_secret(CC_CLIENT)})
    cluster.apply_secret("pw-src", {"secret": idp.client_secret(RT_ONLY_CLIENT)})
    cluster.apply_secret("alice-src", {"username": "alice", "password": idp.password("alice")})
    issuer = {"tokenURL": token_url}
    extra: dict[str, Any] = {}
    if refresh:
        extra["refresh"] = refresh
    if store:
        extra["store"] = store
    specs: dict[str, dict[str, Any]] = {}
    for i in range(cc):
        specs[f"{prefix}cc-{i}"] = {
            "issuer": issuer,
            "grant": {"type": "client_credentials", "clientID": CC_CLIENT,
                      "clientSecretRef": {"name": "cc-src", "key": "secret"}},
            **extra,
        }  # fmt: skip
    for i in range(password):
        specs[f"{prefix}pw-{i}"] = {
            "issuer": issuer,
            "grant": {"type": "password", "clientID": PASSWORD_CLIENT, "clientAuthMethod": "none",
                      "usernameRef": {"name": "alice-src", "key": "username"},
                      "passwordRef": {"name": "alice-src", "key": "password"}},
            **extra,
        }  # fmt: skip
    for i in range(refresh_token):
        name = f"{prefix}rt-{i}"
        token = (bootstraps or {}).get(name) or bootstrap_refresh_token(idp)
        cluster.apply_secret(f"{name}-bootstrap", {"token": token})
        specs[name] = {
            "issuer": issuer,
            "grant": {"type": "refresh_token", "clientID": RT_ONLY_CLIENT,
                      "clientSecretRef": {"name": "pw-src", "key": "secret"},
                      "refreshTokenRef": {"name": f"{name}-bootstrap", "key": "token"}},
            **extra,
        }  # fmt: skip
    return specs


# -- killing the operator mid-refresh ------------------------------------------------------


def rotations_stored(proxy: FaultProxy, api_url: str, namespace: str) -> bool:
    """No refresh_token-only request in flight at ``proxy``, and every refresh token such a
    credential was sent is in a Secret of ``namespace``: a kill now loses no chain.

    The one window no client survives is the opposite: the rotating token sent, the
    answer not yet stored (nothing to log in again with).
    """
    if proxy.in_flight(RT_ONLY_CLIENT):
        return False
    live = proxy.live_refresh_tokens(RT_ONLY_CLIENT)
    return not live or live <= stored_tokens(api_url, namespace, live)


class KillSwitch:
    """Kills the operator (``kill()``) only when ``quiet()``, atomically with ``proxy``
    (:meth:`FaultProxy.kill_if`), which also drops refresh_token-only requests a killed
    process had written (its fence).

    :meth:`at` kills when the next token request of a credential that can log in again
    (client_credentials, password) reaches the proxy (``before-send``: dropped, the IdP
    never sees it) or has been answered by the IdP (``after-answer``: the answer dies with
    the process); :meth:`now` kills as soon as it is quiet.
    """

    def __init__(self, proxy: FaultProxy, quiet: Callable[[], bool], kill: Callable[[], None]) -> None:
        self.proxy, self.quiet, self.kill = proxy, quiet, kill
        self._armed = ""
        self._lock = threading.Lock()
        self._fired = threading.Event()
        proxy.fence = lambda request: request.client_id == RT_ONLY_CLIENT
        proxy.on_request = lambda request: self._on("before-send", request)
        proxy.on_response = lambda request: bool(self._on("after-answer", request))

    def _on(self, when: str, request: ProxiedRequest) -> bool:
        with self._lock:
            if self._armed != when or request.client_id not in (CC_CLIENT, PASSWORD_CLIENT):
                return False
            if not self.proxy.kill_if(self.quiet, self.kill):
                return False
            self._armed = ""
        self._fired.set()
        return True

    def at(self, when: str, timeout: float) -> bool:
        """Kill at ``when`` (``before-send`` or ``after-answer``); false if no such moment came."""
        self._fired.clear()
        with self._lock:
            self._armed = when
        if self._fired.wait(timeout):
            return True
        with self._lock:
            self._armed = ""
        return self._fired.is_set()

    def now(self, timeout: float) -> bool:
        """Kill as soon as it is quiet; false if it was not within ``timeout`` (nothing killed)."""
        deadline = time.monotonic() + timeout
        while not self.proxy.kill_if(self.quiet, self.kill):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True


# -- hostile specs -------------------------------------------------------------------------

MIB = 1024 * 1024


def cc_spec(token_url: str, **changes: Any) -> dict[str, Any]:
    """A client_credentials spec (``cc-client``, secret in ``cc-src``) with ``changes`` by dotted path."""
    spec: dict[str, Any] = {
        "issuer": {"tokenURL": token_url},
        "grant": {"type": "client_credentials", "clientID": CC_CLIENT,
                  "clientSecretRef": {"name": "cc-src", "key": "secret"}},
    }  # fmt: skip
    for path, value in changes.items():
        node = spec
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return spec


#: The longest status message a human can still read in `kubectl describe`.
MAX_MESSAGE = 4096


def check_refusal(counts: Counts, name: str, condition: dict[str, Any], reason: str, field: str) -> None:
    """A hostile spec's Ready condition: False, for ``reason``, naming ``field``, readable."""
    message = condition.get("message", "")
    counts.details.append(f"{name}: {condition['status']} {condition['reason']}: {message[:160]}")
    counts.check(condition["status"] == "False", f"{name}: Ready is {condition['status']}")
    counts.check(condition["reason"] == reason, f"{name}: reason {condition['reason']}, not {reason}")
    counts.check(field in message, f"{name}: the message does not name {field}: {message[:300]}")
    counts.check(len(message) <= MAX_MESSAGE, f"{name}: a {len(message)}-character message")


def hostile_specs(
    token_url: str, *, prefix: str = "", victim: str = "victim", victim_secret: str = "cc-src", foreign: str = "foreign"
) -> dict[str, tuple[dict[str, Any], str, str]]:
    """``prefix + name`` -> (spec, reason expected, text the message must contain: the field).

    ``victim`` is another namespace holding ``victim_secret``; ``foreign`` a Secret of the
    credentials' namespace that tokensync did not create.
    """
    template = "target.template"
    blow_up = "{{ " + " ~ ".join(["access_token"] * 1000) + " }}"
    specs = {
        # Wrong types.
        "type-grant": (cc_spec(token_url, grant="client_credentials"), "InvalidSpec", "spec.grant"),
        "type-scopes": (cc_spec(token_url, **{"grant.scopes": "read"}), "InvalidSpec", "spec.grant.scopes"),
        "type-timeout": (cc_spec(token_url, **{"issuer.timeout": 10}), "InvalidSpec", "spec.issuer.timeout"),
        "type-template": (cc_spec(token_url, **{"target.template": ["x"]}), "InvalidSpec", template),
        "type-labels": (cc_spec(token_url, **{"target.labels": {"a": {"b": "c"}}}), "InvalidSpec", "target.labels"),
        # Huge strings (an API server takes requests up to ~3 MiB, objects up to ~1.5 MiB; the
        # emulator bodies up to 1 MiB).
        "huge-client-id": (cc_spec(token_url, **{"grant.clientID": "c" * (MIB - 64 * 1024)}), "InvalidSpec",
                           "spec.grant.clientID"),
        "huge-template": (cc_spec(token_url, **{"target.template": {"k": "x" * (MIB - 64 * 1024)}}), "InvalidSpec",
                          template),
        # Reaching into another namespace.
        "cross-ns-ref": (cc_spec(token_url, **{"grant.clientSecretRef": {"name": victim_secret, "key": "secret",
                                                                          "namespace": victim}}),
                         "InvalidSpec", "clientSecretRef"),
        "cross-ns-path": (cc_spec(token_url, **{"grant.clientSecretRef": {"name": f"{victim}/{victim_secret}",
                                                                           "key": "secret"}}),
                          "InvalidSpec", "clientSecretRef.name"),
        "cross-ns-target": (cc_spec(token_url, target={"secretName": "stolen", "namespace": victim}), "InvalidSpec",
                            "spec.target"),
        # Someone else's Secret as the target.
        "foreign-target": (cc_spec(token_url, target={"secretName": foreign}), "SecretConflict", f"Secret {foreign}"),
        # Templates that try to do more than put a token field somewhere.
        "tpl-file": (cc_spec(token_url, **{"target.template": {"k": "{{ open('/etc/passwd') }}"}}), "InvalidSpec",
                     template),
        "tpl-attribute": (cc_spec(token_url, **{"target.template": {"k": "{{ access_token.__class__ }}"}}),
                          "InvalidSpec", template),
        "tpl-item": (cc_spec(token_url, **{"target.template": {"k": "{{ access_token[0] }}"}}), "InvalidSpec",
                     template),
        "tpl-loop": (cc_spec(token_url, **{"target.template": {"k": "{% for c in access_token %}{{ c }}{% endfor %}"}}),
                     "InvalidSpec", template),
        "tpl-refresh-token": (cc_spec(token_url, **{"target.template": {"k": "{{ refresh_token }}"}}), "InvalidSpec",
                              template),
        "tpl-filter-chain": (cc_spec(token_url,
                                     **{"target.template": {"k": "{{ access_token" + " | json" * 40 + " }}"}}),
                             "InvalidSpec", template),
        "tpl-output-size": (cc_spec(token_url, **{"target.template": {f"k{i}": blow_up for i in range(32)}}),
                            "InvalidSpec", template),
    }  # fmt: skip
    return {prefix + name: entry for name, entry in specs.items()}


# -- per-scenario figures ------------------------------------------------------------------


@contextlib.contextmanager
def counting(request: Any) -> Iterator[Counts]:
    """A scenario's :class:`Counts`, named by the first line of the test's docstring; this
    process's log records (the emulator, an in-process operator, the proxy) are watched
    for secrets meanwhile, and hits are added to ``leaked``."""
    doc = (request.function.__doc__ or request.node.name).strip().splitlines()[0].rstrip(".")
    result = Counts(scenario=doc)
    watch = leaks.LeakWatch()
    root = logging.getLogger()
    root.addHandler(watch)
    started = time.monotonic()
    try:
        yield result
    finally:
        root.removeHandler(watch)
        result.seconds = time.monotonic() - started
        hits = leaks.scan_records(watch.take())
        if hits:
            result.leaked += len(hits)
            result.details.extend(sorted(set(hits))[:5])


def tally_harm(
    counts: Counts,
    cluster: Any,
    idp: Any,
    names: Iterable[str],
    sampler: SecretSampler,
    proxy: FaultProxy,
    *,
    reused_before: int = 0,
    logs: dict[str, str] | None = None,
) -> None:
    """The four harms of a scenario into ``counts``, with their details: credentials not
    Ready with an active token, expired samples, refresh tokens spent twice (the IdP's
    count, plus ``reused_before`` from before an IdP restart, or the proxy's, whichever
    is more), secrets in the cluster's Events/status and in ``logs``."""
    problems = valid_token_problems(cluster, idp, names)
    counts.lost = len(problems)
    counts.expired = sampler.expired_samples
    counts.spent_twice = max(reused_before + idp.refresh_token_reuse_count(), proxy.refresh_tokens_spent_twice)
    leaked = cluster.leak_report() + (scan_for_leaks(logs) if logs else [])
    counts.leaked += len(leaked)
    counts.details += problems + sampler.violations + leaked


def valid_token_problems(cluster: Any, idp: Any, names: Iterable[str]) -> list[str]:
    """Why each named credential is not Ready with an active token in its Secret (empty: all fine)."""
    problems = []
    for name in names:
        condition = cluster.condition(name) or {}
        if condition.get("status") != "True":
            problems.append(f"{name} not Ready: {condition.get('reason')}: {condition.get('message', '')[:200]}")
            continue
        data = cluster.secret_data(name) or {}
        token = data.get("access_token")
        if not token or not idp.introspect(token).get("active"):
            problems.append(f"{name} Ready but its Secret holds no active token")
    return problems
