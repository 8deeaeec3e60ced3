"""Prometheus metrics: what an operator team needs to see before a token expires.

Per credential (labels ``namespace``, ``name``; removed when the credential is):

* ``tokensync_credential_expiry_timestamp_seconds`` — when its current token expires
  (the alert "expiring within its renew window" is ``… - time() < 120``);
* ``tokensync_credential_ready`` — 1 when the Secret holds a valid token for the spec.

Across credentials (bounded label sets only: a label per credential on counters
and histograms would grow without bound at ten thousand credentials):

* ``tokensync_refresh_total{outcome, reason, error}`` — renewals by outcome, with the
  condition reason and the OAuth ``error`` code of failures;
* ``tokensync_token_endpoint_request_duration_seconds{status}`` — latency of token
  endpoint requests by HTTP status class;
* ``tokensync_store_operations_total{backend, operation, outcome}``.

Each :class:`Metrics` has its own registry, so several controllers (tests, the demo)
never collide in the process-global default registry.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tokensync.stores.base import AsyncCredentialStore

__all__ = ["InstrumentedStore", "Metrics"]

T = TypeVar("T")
Key = tuple[str, str]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.expiry = Gauge(
            "tokensync_credential_expiry_timestamp_seconds",
            "When the credential's current access token expires (Unix time).",
            ["namespace", "name"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "tokensync_credential_ready",
            "1 when the credential's Secret holds a valid token for its current spec.",
            ["namespace", "name"],
            registry=self.registry,
        )
        self.refreshes = Counter(
            "tokensync_refresh",
            "Token renewals by outcome; failures carry the condition reason and OAuth error code.",
            ["outcome", "reason", "error"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tokensync_token_endpoint_request_duration_seconds",
            "Latency of token endpoint requests, by HTTP status class.",
            ["status"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.store_ops = Counter(
            "tokensync_store_operations",
            "Credential store operations by backend, operation and outcome.",
            ["backend", "operation", "outcome"],
            registry=self.registry,
        )
        # Label children of the hot path, looked up once (``labels()`` takes a lock and
        # builds a tuple on each call).
        self._renewed = self.refreshes.labels("success", "", "")

    def credential_ok(self, key: Key, expires_at: float | None) -> None:
        self.ready.labels(*key).set(1)
        if expires_at is not None:
            self.expiry.labels(*key).set(expires_at)

    def credential_failing(self, key: Key, *, ready: bool) -> None:
        self.ready.labels(*key).set(1 if ready else 0)

    def renewed(self) -> None:
        self._renewed.inc()

    def renewal_failed(self, reason: str, error: str | None) -> None:
        self.refreshes.labels("failure", reason, error or "").inc()

    def forget(self, key: Key) -> None:
        for gauge in (self.expiry, self.ready):
            with contextlib.suppress(KeyError):
                gauge.remove(*key)

    def http_hooks(self) -> dict[str, list[Callable[[Any], Any]]]:
        """httpx event hooks timing every request of an IdP client."""

        async def on_request(request: httpx.Request) -> None:
            request.extensions["tokensync_started"] = time.perf_counter()

        async def on_response(response: httpx.Response) -> None:
            started = response.request.extensions.get("tokensync_started")
            if started is not None:
                status = f"{response.status_code // 100}xx"
                self.latency.labels(status).observe(time.perf_counter() - started)

        return {"request": [on_request], "response": [on_response]}


class InstrumentedStore(AsyncCredentialStore[T]):
    """Counts a store's operations; the wrapped store's behaviour is unchanged."""

    def __init__(self, inner: AsyncCredentialStore[T], metrics: Metrics, backend: str) -> None:
        self._inner = inner
        self._metrics = metrics
        self._backend = backend
        self._ok = {op: metrics.store_ops.labels(backend, op, "ok") for op in ("load", "save", "clear")}

    async def _count(self, operation: str, call: Callable[[], Any]) -> Any:
        try:
            result = await call()
        except Exception:
            self._metrics.store_ops.labels(self._backend, operation, "error").inc()
            raise
        self._ok[operation].inc()
        return result

    async def load(self) -> T | None:
        result: T | None = await self._count("load", self._inner.load)
        return result

    async def save(self, value: T) -> None:
        await self._count("save", lambda: self._inner.save(value))

    async def clear(self) -> None:
        await self._count("clear", self._inner.clear)

    def __repr__(self) -> str:
        return f"InstrumentedStore({self._inner!r})"
