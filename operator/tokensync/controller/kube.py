"""The operator's own Kubernetes API calls, asynchronous, over one aiohttp session.

Why not the generated ``kubernetes`` client for these calls: it is synchronous, so
every refresh would cost a thread hop, and it (de)serialises through OpenAPI
models, which is most of the CPU a refresh would take. The ``kubernetes`` package
is still what reads kubeconfig files and in-cluster service-account credentials
(:func:`load_configuration`), including exec plugins and token rotation, because
that part is subtle and well kept there; its token refresh runs in a worker thread
here (:class:`_BearerFromConfiguration`), never on the event loop.

Why aiohttp rather than httpx: kopf already runs on aiohttp, and its C HTTP parser and
flat connection pool cost about 3.5 ms less CPU per refresh than httpx/httpcore did
(``bench/``, S2: httpcore rescans its whole pool on every request). httpx stays the
token-endpoint client (``tokensync.auth``); an ``httpx.AsyncClient`` may still be passed
to :class:`KubeClient` to route the calls through any httpx transport.

Every call here is one the RBAC in ``manifests/`` must allow; keep the list short:

=========================  ==================================================
call                       RBAC
=========================  ==================================================
read/list Secrets          secrets: get, list (labelled ones only), watch
create/replace/delete      secrets: create, update, delete
patch CR status            oauthcredentials/status: patch
create Event               events (core v1): create
=========================  ==================================================
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import aiohttp
import httpx

from tokensync import __version__
from tokensync.models.credential import GROUP, PLURAL, VERSION
from tokensync.stores.kubernetes import ApiConflictError, ApiError, ApiNotFoundError

__all__ = ["KubeClient", "bearer_header", "load_configuration"]

logger = logging.getLogger("tokensync.kube")

MERGE_PATCH = "application/merge-patch+json"
USER_AGENT = f"tokensync/{__version__}"  # API server audit logs tell tokensync's calls from kopf's
#: How long a bearer header read from the kubernetes Configuration is reused. The
#: Configuration's own refresh hook re-reads in-cluster tokens every minute and runs an
#: exec plugin again 5 minutes before its token's expiry, so the header it hands out is
#: valid for minutes longer than this; asking it again costs a thread hop, and, when it
#: is due, a file read or a subprocess.
TOKEN_REUSE_SECONDS = 10.0
ATTEMPTS = 5


def bearer_header(configuration: Any) -> str | None:
    """The ``Authorization`` header value a kubernetes Configuration holds, if any.

    kubernetes >= 36 keeps it under ``BearerToken``, older versions under
    ``authorization``; asking through ``get_api_key_with_prefix`` also runs the
    refresh hook that re-reads rotated service-account tokens and runs exec plugins
    again near their token's expiry: it may block, so call it off the event loop.
    """
    header: str | None = configuration.get_api_key_with_prefix("BearerToken") or (
        configuration.get_api_key_with_prefix("authorization")
    )
    return header or None


class _BearerFromConfiguration:
    """The Configuration's bearer header, read in a worker thread and reused for
    :data:`TOKEN_REUSE_SECONDS`: in-cluster service-account tokens are rotated on disk and
    exec plugins (``users[].user.exec``) are subprocesses, and neither may stall the loop."""

    def __init__(self, configuration: Any) -> None:
        self._configuration = configuration
        self._header: str | None = None
        self._read_at = -float("inf")
        self._lock: asyncio.Lock | None = None

    async def header(self) -> str | None:
        if time.monotonic() - self._read_at < TOKEN_REUSE_SECONDS:
            return self._header
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one refresh at a time; the others wait for its result
            if time.monotonic() - self._read_at >= TOKEN_REUSE_SECONDS:
                self._header = await asyncio.to_thread(bearer_header, self._configuration)
                self._read_at = time.monotonic()
        return self._header

    def forget(self) -> None:
        """After a 401: ask the Configuration again on the next call."""
        self._read_at = -float("inf")


def load_configuration(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """A ``kubernetes.client.Configuration`` from a kubeconfig file or the in-cluster service account."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            return configuration
        except config.ConfigException:
            pass
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig, context=context, client_configuration=configuration
    )
    return configuration


# -- transports ---------------------------------------------------------------------


class _Response:
    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: Mapping[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers  # case-insensitive
        self.content = content

    def json(self) -> Any:
        return json.loads(self.content)


class _SentError(Exception):
    """The connection failed after the request may have reached the server."""


class _UnsentError(Exception):
    """The request never left: no connection could be made."""


class _Transport(Protocol):
    async def request(
        self, method: str, path: str, *, content: bytes | None, params: dict[str, str] | None, headers: dict[str, str]
    ) -> _Response: ...

    async def close(self) -> None: ...


def _env_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY``, ``NO_PROXY``...), read
    once as httpx did, rather than by aiohttp on every request."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    return proxies.get(parts.scheme) or proxies.get("all")


class _AiohttpTransport:
    """One aiohttp session, created on first use inside the running loop."""

    def __init__(
        self, base_url: str, *, ssl_context: ssl.SSLContext | bool, max_connections: int, headers: dict[str, str]
    ) -> None:
        self._base = base_url.rstrip("/")  # a path prefix (an API proxy) is kept
        self._ssl: ssl.SSLContext | bool = ssl_context
        self._limit = max_connections
        self._headers = headers
        self._proxy = _env_proxy(self._base)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Read timeout and connect timeout as the httpx client had; no total bound below
        # a minute, so a slow but live API server is not cut off mid-answer.
        timeout = aiohttp.ClientTimeout(total=60, sock_connect=10, sock_read=30)
        connector = aiohttp.TCPConnector(limit=self._limit, ssl=self._ssl)
        session = aiohttp.ClientSession(
            headers=self._headers,
            timeout=timeout,
            connector=connector,
            proxy=self._proxy,
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # the API server sets none; skip the per-request filtering
        )
        # aiohttp silently sends a PUT or DELETE again when a kept-alive connection drops
        # (RFC 9112 9.3.1). A PUT with a resourceVersion is not idempotent in that sense: had
        # the first one been applied, the resend meets it as a 409 that nothing here could
        # tell from a real conflict. Every retry is KubeClient._call's: counted, backed
        # off, and known to follow an attempt that may have been applied.
        # (No public switch; aiohttp's own test client sets the same attribute.)
        session._retry_connection = False
        return session

    async def request(
        self, method: str, path: str, *, content: bytes | None, params: dict[str, str] | None, headers: dict[str, str]
    ) -> _Response:
        session = self._session
        if session is None or session.closed:
            session = self._session = self._open()
        try:
            async with session.request(
                method, self._base + path, data=content, params=params, headers=headers
            ) as response:
                return _Response(response.status, response.headers, await response.read())
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise _UnsentError(type(exc).__name__) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _SentError(type(exc).__name__) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class _HttpxTransport:
    """Calls through an ``httpx.AsyncClient`` (any httpx transport, e.g. a test's)."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    async def request(
        self, method: str, path: str, *, content: bytes | None, params: dict[str, str] | None, headers: dict[str, str]
    ) -> _Response:
        try:
            response = await self._http.request(method, path, content=content, params=params, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise _UnsentError(type(exc).__name__) from None
        except httpx.HTTPError as exc:
            raise _SentError(type(exc).__name__) from None
        return _Response(response.status_code, response.headers, response.content)

    async def close(self) -> None:
        await self._http.aclose()


def _ssl_context(configuration: Any) -> ssl.SSLContext | bool:
    """TLS as the kubeconfig or service account says: its CA (file, or data the loader
    wrote to a file), its client certificate, or no verification at all
    (``insecure-skip-tls-verify``, which still presents the client certificate)."""
    if configuration.verify_ssl:
        context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
    elif configuration.cert_file:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        return False
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file)
    return context


def _matches(sent: dict[str, Any], actual: dict[str, Any] | None) -> bool:
    """Does the object read back hold what a write sent: the same ``type`` and ``data``,
    and every label and annotation of the write? (Others may add labels; they do not
    make our write any less applied.)"""
    if actual is None:
        return False
    if (actual.get("data") or {}) != (sent.get("data") or {}):
        return False
    if "type" in sent and actual.get("type", "Opaque") != sent["type"]:
        return False
    sent_meta, actual_meta = sent.get("metadata") or {}, actual.get("metadata") or {}
    for field in ("labels", "annotations"):
        have = actual_meta.get(field) or {}
        if any(have.get(k) != v for k, v in (sent_meta.get(field) or {}).items()):
            return False
    return True


class KubeClient:
    """A thin async client for the handful of calls the operator makes."""

    def __init__(self, http: httpx.AsyncClient | _Transport, *, auth: _BearerFromConfiguration | None = None) -> None:
        self._http: _Transport = _HttpxTransport(http) if isinstance(http, httpx.AsyncClient) else http
        self._auth = auth
        self.requests: dict[tuple[str, str], int] = {}

    @classmethod
    def from_configuration(cls, configuration: Any, *, max_connections: int = 32) -> KubeClient:
        transport = _AiohttpTransport(
            configuration.host,
            ssl_context=_ssl_context(configuration),
            max_connections=max_connections,
            headers={"User-Agent": USER_AGENT},
        )
        return cls(transport, auth=_BearerFromConfiguration(configuration))

    @classmethod
    def for_url(cls, url: str, *, token: str | None = None, max_connections: int = 100) -> KubeClient:
        """For emulators and tests: a plain URL, optionally a bearer token."""
        headers = {"User-Agent": USER_AGENT, **({"Authorization": f"Bearer {token}"} if token else {})}
        return cls(_AiohttpTransport(url, ssl_context=False, max_connections=max_connections, headers=headers))

    async def close(self) -> None:
        await self._http.close()

    # -- plumbing -----------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        resource: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
        read_back: Callable[[], Awaitable[dict[str, Any] | None]] | None = None,
    ) -> Any:
        """One API call with a bounded retry of what the API server asks to retry.

        429 and 5xx (and connection failures) are retried here a few times with a
        short backoff, honouring Retry-After: an API server that restarts or
        sheds load must not turn into credential failures. 409 and 404 are
        answers, not failures: they are raised for the caller to decide.

        A write retried after a 5xx or a lost response may have been applied the first
        time; its retry then meets its own write as a 409 (a stale resourceVersion, or
        AlreadyExists). For such a 409, ``read_back`` reads the object again: if it holds
        what this write sent, the write is done and the object is returned.
        """
        key = (method, resource)
        content = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = {"Content-Type": content_type, "Accept": "application/json"} if content is not None else {}
        delay = 0.2
        maybe_applied = False  # an earlier attempt of this write may have reached the server
        for attempt in range(ATTEMPTS):
            self.requests[key] = self.requests.get(key, 0) + 1
            if self._auth is not None:
                authorization = await self._auth.header()
                if authorization:
                    headers["Authorization"] = authorization
            try:
                response = await self._http.request(method, path, content=content, params=params, headers=headers)
            except (_SentError, _UnsentError) as exc:
                maybe_applied = maybe_applied or isinstance(exc, _SentError)
                if attempt == ATTEMPTS - 1:
                    raise ApiError(f"{method} {path}: {exc}") from None
                await asyncio.sleep(delay)
                delay *= 2
                continue
            if response.status_code == 429 or response.status_code >= 500:
                maybe_applied = maybe_applied or response.status_code >= 500
                if attempt == ATTEMPTS - 1:
                    break
                retry_after = response.headers.get("retry-after", "")
                await asyncio.sleep(float(retry_after) if retry_after.isdigit() else delay)
                delay *= 2
                continue
            break
        if response.status_code == 401 and self._auth is not None:
            self._auth.forget()  # rotated or expired: read the token again next time
        if response.status_code == 409 and maybe_applied and read_back is not None:
            actual = await read_back()
            if _matches(body, actual):
                logger.info("%s %s: a retry met its own earlier write (409); it was applied", method, path)
                return actual
        return self._result(method, path, response)

    @staticmethod
    def _result(method: str, path: str, response: _Response) -> Any:
        if response.status_code < 300:
            return response.json() if response.content else None
        reason = ""
        message = ""
        try:
            status = response.json()
            reason = str(status.get("reason", ""))
            message = str(status.get("message", ""))[:300]
        except (ValueError, AttributeError):
            pass
        text = f"{method} {path}: HTTP {response.status_code} {reason} {message}".strip()
        if response.status_code == 404:
            raise ApiNotFoundError(text, status=404, reason=reason)
        if response.status_code == 409:
            raise ApiConflictError(text, status=409, reason=reason)
        raise ApiError(text, status=response.status_code, reason=reason)

    # -- Secrets (also the SecretsAPI of the Kubernetes store) ---------------------------

    @staticmethod
    def _secrets(namespace: str | None, name: str | None = None) -> str:
        base = f"/api/v1/namespaces/{quote(namespace)}/secrets" if namespace else "/api/v1/secrets"
        return f"{base}/{quote(name)}" if name else base

    async def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self._call("GET", self._secrets(namespace, name), resource="secrets")
        except ApiNotFoundError:
            return None
        return result

    async def list_secrets(self, namespace: str | None, *, label_selector: str) -> list[dict[str, Any]]:
        """A labelled LIST, paginated: never the cluster's every Secret."""
        items: list[dict[str, Any]] = []
        params = {"labelSelector": label_selector, "limit": "500"}
        while True:
            page = await self._call("GET", self._secrets(namespace), resource="secrets", params=params)
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items
            params = {**params, "continue": token}

    async def create_secret(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        name = (body.get("metadata") or {}).get("name")

        async def read_back() -> dict[str, Any] | None:
            return await self.read_secret(namespace, name) if name else None

        result: dict[str, Any] = await self._call(
            "POST", self._secrets(namespace), resource="secrets", body=body, read_back=read_back
        )
        return result

    async def replace_secret(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        async def read_back() -> dict[str, Any] | None:
            return await self.read_secret(namespace, name)

        result: dict[str, Any] = await self._call(
            "PUT", self._secrets(namespace, name), resource="secrets", body=body, read_back=read_back
        )
        return result

    async def delete_secret(self, namespace: str, name: str) -> None:
        await self._call("DELETE", self._secrets(namespace, name), resource="secrets")

    # -- the custom resource ------------------------------------------------------

    async def patch_credential_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch ``.status`` through the status subresource (never ``spec``).

        The patch carries no resourceVersion, so the API server never answers it with a
        409 Conflict, and applying it twice is applying it once: a retry after a lost
        answer needs no read-back (which would need ``get`` on credentials besides).
        """
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace)}/{PLURAL}/{quote(name)}/status"
        result: dict[str, Any] = await self._call(
            "PATCH", path, resource=f"{PLURAL}/status", body={"status": status}, content_type=MERGE_PATCH
        )
        return result

    async def create_event(self, namespace: str, body: dict[str, Any]) -> None:
        """Events are named by the API server (``generateName``): a retried POST can
        never conflict, at worst it posts the same Event twice."""
        await self._call("POST", f"/api/v1/namespaces/{quote(namespace)}/events", resource="events", body=body)
