"""An API emulator that fails on demand, as an overloaded, restarting or contended API server does.

:class:`FaultyCluster` subclasses :class:`tokensync.devkit.kube.ClusterEmulator` (kmock's
docs invite subclassing) and changes nothing until a fault is injected. Faults apply to
the next ``limit`` requests that ``match(method, path)``:

* ``status``: answered with a Kubernetes ``Status`` of that code (500, 503, 429 with
  ``Retry-After``...); nothing is applied.
* ``applied-then-status``: the request is applied (a write lands, watchers see it), then
  answered like ``status``: the client cannot know whether its write happened.
* ``reset``: the connection is aborted before the request is read; nothing is applied.
* ``applied-then-reset``: applied, then the connection is aborted: the answer is lost.
* ``conflict``: another writer touches the object (an annotation) just before this write,
  so a write conditional on ``resourceVersion`` meets a genuine 409, and an unconditional
  one lands on top, as on a real cluster.

:meth:`FaultyCluster.drop_watches` aborts every open watch connection at once (an API
server restart, a load balancer's idle timeout). Faults are injected from any thread;
``injected`` counts them by mode.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import attrs
import kmock

from tokensync.devkit.kube import ClusterEmulator

MODES = ("status", "applied-then-status", "reset", "applied-then-reset", "conflict")
TOUCH_ANNOTATION = "faults.tokensync.dev/touched"

_conflicting: contextvars.ContextVar[bool] = contextvars.ContextVar("conflicting", default=False)


@dataclass
class ApiFault:
    mode: str
    match: Callable[[str, str], bool]
    limit: int
    status: int = 503
    retry_after: int | None = None


def _status(code: int, retry_after: int | None) -> aiohttp.web.Response:
    reasons = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}
    body = {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "code": code,
        "reason": reasons.get(code, "InternalError"),
        "message": "injected by the fault tests",
    }
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return aiohttp.web.json_response(body, status=code, headers=headers)


@attrs.define(kw_only=True)
class FaultyCluster(ClusterEmulator):
    injected: Counter[str] = attrs.field(factory=Counter, init=False)
    _faults: list[ApiFault] = attrs.field(factory=list, init=False)
    _fault_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _watches: set[Any] = attrs.field(factory=set, init=False)

    def inject(
        self,
        mode: str,
        *,
        match: Callable[[str, str], bool],
        limit: int = 1,
        status: int = 503,
        retry_after: int | None = None,
    ) -> None:
        assert mode in MODES, mode
        with self._fault_lock:
            self._faults.append(ApiFault(mode, match, limit, status, retry_after))

    def clear_faults(self) -> None:
        with self._fault_lock:
            self._faults.clear()

    @property
    def pending_faults(self) -> int:
        with self._fault_lock:
            return sum(f.limit for f in self._faults)

    def drop_watches(self) -> int:
        """Abort every open watch connection; how many. Call it in the emulator's loop."""
        dropped = list(self._watches)
        for transport in dropped:
            transport.abort()
        self._watches.difference_update(dropped)
        self.injected["watch dropped"] += len(dropped)
        return len(dropped)

    def _take(self, method: str, path: str) -> ApiFault | None:
        with self._fault_lock:
            for fault in self._faults:
                if fault.limit > 0 and fault.match(method, path):
                    fault.limit -= 1
                    self.injected[fault.mode] += 1
                    return fault
            self._faults = [f for f in self._faults if f.limit > 0]
        return None

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw_request.query.get("watch") in ("true", "1"):
            transport = raw_request.transport
            self._watches.add(transport)
            try:
                return await super().__call__(raw_request)
            finally:
                self._watches.discard(transport)
        fault = self._take(raw_request.method, raw_request.path)
        if fault is None:
            return await super().__call__(raw_request)
        if fault.mode == "status":
            return _status(fault.status, fault.retry_after)
        if fault.mode == "reset":
            return self._abort(raw_request)
        if fault.mode == "conflict":
            token = _conflicting.set(True)
            try:
                return await super().__call__(raw_request)
            finally:
                _conflicting.reset(token)
        await super().__call__(raw_request)  # applied; its answer is replaced or lost
        if fault.mode == "applied-then-reset":
            return self._abort(raw_request)
        return _status(fault.status, fault.retry_after)

    @staticmethod
    def _abort(raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw_request.transport is not None:
            raw_request.transport.abort()
        return aiohttp.web.Response(status=500)  # never reaches the client

    async def _write(self, request: kmock.Request) -> Any:
        if _conflicting.get() and request.resource is not None and request.name is not None:
            key = (request.resource, self._scope(request), request.name)
            count = self.injected["conflict"]

            def touch(body: dict[str, Any]) -> dict[str, Any]:
                annotations = body.setdefault("metadata", {}).setdefault("annotations", {}) or {}
                body["metadata"]["annotations"] = {**annotations, TOUCH_ANNOTATION: str(count)}
                return body

            with contextlib.suppress(kmock.KubernetesError):  # gone: the write meets that instead
                await self._update(key, None, touch, None)
        return await super()._write(request)
