"""OIDC discovery (OpenID Connect Discovery 1.0 section 4): issuer URL to token endpoint.

Cached per issuer for ``ttl`` seconds, because thousands of credentials usually
share a handful of issuers and the document rarely changes. Concurrent lookups of
one issuer share one request. A failed lookup is not cached.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from tokensync.auth.errors import ConfigurationError, InvalidResponseError, ServerUnavailableError
from tokensync.auth.manager import transport_error

__all__ = ["DiscoveryCache", "well_known_url"]


def well_known_url(issuer_url: str) -> str:
    return issuer_url.rstrip("/") + "/.well-known/openid-configuration"


class DiscoveryCache:
    """Token endpoints by issuer URL."""

    def __init__(self, *, ttl: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._cache: dict[str, tuple[float, str]] = {}
        self._inflight: dict[str, asyncio.Future[str]] = {}

    async def token_endpoint(self, http: httpx.AsyncClient, issuer_url: str) -> str:
        hit = self._cache.get(issuer_url)
        if hit is not None and hit[0] > self._clock():
            return hit[1]
        pending = self._inflight.get(issuer_url)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._inflight[issuer_url] = future
        try:
            endpoint = await self._fetch(http, issuer_url)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        else:
            future.set_result(endpoint)
            self._cache[issuer_url] = (self._clock() + self._ttl, endpoint)
            return endpoint
        finally:
            del self._inflight[issuer_url]

    async def _fetch(self, http: httpx.AsyncClient, issuer_url: str) -> str:
        url = well_known_url(issuer_url)
        try:
            response = await http.get(url, headers={"Accept": "application/json"})
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise transport_error(exc) from None
        if response.status_code >= 500 or response.status_code == 429:
            raise ServerUnavailableError(
                f"OIDC discovery at {url} answered HTTP {response.status_code}", status_code=response.status_code
            )
        if response.status_code != 200:
            raise ConfigurationError(
                f"OIDC discovery at {url} answered HTTP {response.status_code}: check issuer.issuerURL"
            )
        try:
            document = response.json()
        except ValueError:
            raise InvalidResponseError(f"OIDC discovery at {url} did not answer JSON") from None
        endpoint = document.get("token_endpoint") if isinstance(document, dict) else None
        if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
            raise ConfigurationError(f"OIDC discovery at {url} names no token_endpoint")
        return endpoint
