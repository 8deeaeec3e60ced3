"""The operator's own Kubernetes API calls, asynchronous, over one httpx connection pool.

Why not the generated ``kubernetes`` client for these calls: it is synchronous, so
every refresh would cost a thread hop, and it (de)serialises through OpenAPI
models, which is most of the CPU a refresh would take. The ``kubernetes`` package
is still what reads kubeconfig files and in-cluster service-account credentials
(:func:`load_configuration`), including exec plugins and token rotation, because
that part is subtle and well kept there.

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
from typing import Any
from urllib.parse import quote

import httpx

from tokensync import __version__
from tokensync.models.credential import GROUP, PLURAL, VERSION
from tokensync.stores.kubernetes import ApiConflictError, ApiError, ApiNotFoundError

__all__ = ["KubeClient", "bearer_header", "load_configuration"]

logger = logging.getLogger("tokensync.kube")

MERGE_PATCH = "application/merge-patch+json"
USER_AGENT = f"tokensync/{__version__}"  # API server audit logs tell tokensync's calls from kopf's


def bearer_header(configuration: Any) -> str | None:
    """The ``Authorization`` header value a kubernetes Configuration holds, if any.

    kubernetes >= 36 keeps it under ``BearerToken``, older versions under
    ``authorization``; asking through ``get_api_key_with_prefix`` also runs the
    refresh hook that re-reads rotated service-account tokens.
    """
    header: str | None = configuration.get_api_key_with_prefix("BearerToken") or (
        configuration.get_api_key_with_prefix("authorization")
    )
    return header or None


class _BearerFromConfiguration(httpx.Auth):
    """Ask the kubernetes Configuration for the token on each request: in-cluster
    service-account tokens are rotated on disk, and the Configuration's refresh hook
    re-reads them."""

    def __init__(self, configuration: Any) -> None:
        self._configuration = configuration

    def auth_flow(self, request: httpx.Request) -> Any:
        header = bearer_header(self._configuration)
        if header:
            request.headers["Authorization"] = header
        yield request


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


class KubeClient:
    """A thin async client for the handful of calls the operator makes."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http
        self.requests: dict[tuple[str, str], int] = {}

    @classmethod
    def from_configuration(cls, configuration: Any, *, max_connections: int = 32) -> KubeClient:
        verify: ssl.SSLContext | bool = False
        if configuration.verify_ssl:
            context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
            if configuration.cert_file:
                context.load_cert_chain(configuration.cert_file, configuration.key_file)
            verify = context
        http = httpx.AsyncClient(
            base_url=configuration.host,
            auth=_BearerFromConfiguration(configuration),
            verify=verify,
            timeout=httpx.Timeout(30.0, connect=10.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers={"User-Agent": USER_AGENT},
        )
        return cls(http)

    @classmethod
    def for_url(cls, url: str, *, token: str | None = None) -> KubeClient:
        """For emulators and tests: a plain URL, optionally a bearer token."""
        headers = {"User-Agent": USER_AGENT, **({"Authorization": f"Bearer {token}"} if token else {})}
        return cls(httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(30.0, connect=10.0)))

    async def close(self) -> None:
        await self._http.aclose()

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
    ) -> Any:
        """One API call with a bounded retry of what the API server asks to retry.

        429 and 5xx (and connection failures) are retried here a few times with a
        short backoff, honouring Retry-After: an API server that restarts or
        sheds load must not turn into credential failures. 409 and 404 are
        answers, not failures: they are raised for the caller to decide.
        """
        key = (method, resource)
        content = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = {"Content-Type": content_type, "Accept": "application/json"} if content is not None else None
        delay = 0.2
        for attempt in range(5):
            self.requests[key] = self.requests.get(key, 0) + 1
            try:
                response = await self._http.request(method, path, content=content, params=params, headers=headers)
            except httpx.HTTPError as exc:
                if attempt == 4:
                    raise ApiError(f"{method} {path}: {type(exc).__name__}") from None
                await asyncio.sleep(delay)
                delay *= 2
                continue
            if response.status_code == 429 or response.status_code >= 500:
                if attempt == 4:
                    break
                retry_after = response.headers.get("retry-after", "")
                await asyncio.sleep(float(retry_after) if retry_after.isdigit() else delay)
                delay *= 2
                continue
            break
        return self._result(method, path, response)

    @staticmethod
    def _result(method: str, path: str, response: httpx.Response) -> Any:
        if response.status_code < 300:
            return response.json() if response.content else None
        reason = ""
        message = ""
        try:
            status = response.json()
            reason = str(status.get("reason", ""))
            message = str(status.get("message", ""))[:300]
        except ValueError:
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
        result: dict[str, Any] = await self._call("POST", self._secrets(namespace), resource="secrets", body=body)
        return result

    async def replace_secret(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("PUT", self._secrets(namespace, name), resource="secrets", body=body)
        return result

    async def delete_secret(self, namespace: str, name: str) -> None:
        await self._call("DELETE", self._secrets(namespace, name), resource="secrets")

    # -- the custom resource ------------------------------------------------------

    async def patch_credential_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch ``.status`` through the status subresource (never ``spec``)."""
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace)}/{PLURAL}/{quote(name)}/status"
        result: dict[str, Any] = await self._call(
            "PATCH", path, resource=f"{PLURAL}/status", body={"status": status}, content_type=MERGE_PATCH
        )
        return result

    async def create_event(self, namespace: str, body: dict[str, Any]) -> None:
        await self._call("POST", f"/api/v1/namespaces/{quote(namespace)}/events", resource="events", body=body)
