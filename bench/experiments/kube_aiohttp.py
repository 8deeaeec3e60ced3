"""Experiment: tokensync's KubeClient over aiohttp (kopf's own HTTP client) instead of httpx.

Run with ``bench/run.py --operator-preload bench/experiments/kube_aiohttp.py``. It swaps the
transport under :class:`tokensync.controller.kube.KubeClient` for emulator URLs
(``KubeClient.for_url``) and leaves every decision of the client (retries, errors) as is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import aiohttp
import httpx

from tokensync.controller import kube


class _Response:
    def __init__(self, status: int, headers: Mapping[str, str], content: bytes) -> None:
        self.status_code = status
        self.headers = {k.lower(): v for k, v in headers.items()}
        self.content = content

    def json(self) -> Any:
        return json.loads(self.content)


class AiohttpAdapter:
    """The subset of ``httpx.AsyncClient`` that KubeClient uses, on an aiohttp session."""

    def __init__(self, base_url: str, headers: dict[str, str], limit: int = 32) -> None:
        self._base = base_url.rstrip("/")
        self._headers = headers
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None

    async def request(
        self, method: str, path: str, *, content: Any = None, params: Any = None, headers: Any = None
    ) -> _Response:
        if self._session is None:  # created inside the running loop
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=30, connect=10),
                connector=aiohttp.TCPConnector(limit=self._limit),
            )
        try:
            async with self._session.request(
                method, self._base + path, data=content, params=params, headers=headers
            ) as response:
                return _Response(response.status, response.headers, await response.read())
        except aiohttp.ClientError as exc:
            raise httpx.TransportError(str(exc)) from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _for_url(cls: type[kube.KubeClient], url: str, *, token: str | None = None) -> kube.KubeClient:
    headers = {"User-Agent": getattr(kube, "USER_AGENT", "tokensync")}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return cls(AiohttpAdapter(url, headers))  # type: ignore[arg-type]


kube.KubeClient.for_url = classmethod(_for_url)  # type: ignore[assignment, method-assign]
print("bench experiment: KubeClient over aiohttp", flush=True)
