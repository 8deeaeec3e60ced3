"""The Kubernetes API emulator as its own process, counting requests by client, verb and resource.

``python bench/emulator_main.py --port P --namespace bench --kubeconfig FILE`` serves
:func:`tokensync.devkit.kube.serve_cluster` with the project's CRD and prints
``READY <url>`` once it answers. Requests carrying ``X-Bench-Driver: 1`` are the bench
driver's own (creating CRs, polling) and are counted apart from everyone else's
(the operator: kopf's watches plus tokensync's own client).

Bench endpoints (answered before the emulator sees the request):

* ``GET /_bench/counts`` -> ``{"operator": {"update secrets": 3, ...}, "driver": {...}}``
* ``POST /_bench/reset`` -> zero the counters.

``--write-error-rate F`` answers a share F of the operator's writes with HTTP 500 *after*
applying them, as an API server does when etcd is slow: a robustness probe, off by default.

kmock records every request it serves (for test assertions) and matches each new request
against all of them; this process drops finished requests as it goes, so that the
emulator's cost per request stays flat over a long run (see ``CountingEmulator._trim``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DRIVER_HEADER

from tokensync.devkit.kube import ClusterEmulator, serve_cluster
from tokensync.models.crd import crd_manifest

_PATH = re.compile(
    r"^/(?:api/(?P<cv>v1)|apis/(?P<group>[^/]+)/(?P<gv>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?(?:/(?P<plural>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?)?/?$"
)
_TRIM_AT = 64
_WRITE_METHODS = (kmock.method.POST, kmock.method.PUT, kmock.method.PATCH, kmock.method.DELETE)


def classify(method: str, path: str, query: dict[str, str]) -> tuple[str, str]:
    """(verb, resource) of one request, in Kubernetes terms: ``("update", "secrets")``."""
    match = _PATH.match(path)
    if match is None:
        return method.lower(), "discovery" if path.startswith(("/api", "/version", "/openapi")) else path
    plural, name, sub = match["plural"], match["name"], match["sub"]
    if match["ns"] is not None and plural is None:  # /api/v1/namespaces/NAME
        plural, name = "namespaces", match["ns"]
    if plural is None:
        return "get", "discovery"
    resource = f"{plural}/{sub}" if sub else plural
    if method == "GET":
        verb = "watch" if query.get("watch") in ("true", "1") else "get" if name else "list"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())
        if method == "DELETE" and name is None:
            verb = "deletecollection"
    return verb, resource


def _fix_core_discovery(response: aiohttp.web.Response) -> aiohttp.web.Response:
    """kmock 0.8 answers ``/api/v1`` with ``groupVersion: "/v1"``; kubectl needs ``"v1"``
    (otherwise: "the server doesn't have a resource type secrets"). Patched here so that the
    baseline's kubectl can talk to the emulator; kopf and tokensync do not read that field."""
    try:
        body = json.loads(response.body or b"")  # type: ignore[arg-type]
    except ValueError:
        return response
    if not isinstance(body, dict) or body.get("groupVersion") != "/v1":
        return response
    body["groupVersion"] = "v1"
    return aiohttp.web.json_response(body, status=response.status)


@attrs.define(kw_only=True)
class CountingEmulator(ClusterEmulator):
    counts: dict[str, Counter[str]] = attrs.field(factory=lambda: {"operator": Counter(), "driver": Counter()})
    write_error_rate: float = 0.0
    _inflight: set[int] = attrs.field(factory=set, init=False)
    _random: random.Random = attrs.field(factory=lambda: random.Random(42), init=False)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw_request.path.startswith("/_bench/"):
            return self._bench(raw_request)
        verb, resource = classify(raw_request.method, raw_request.path, dict(raw_request.query))
        who = "driver" if raw_request.headers.get(DRIVER_HEADER) else "operator"
        self.counts[who][f"{verb} {resource}"] += 1
        try:
            response = await super().__call__(raw_request)
        finally:
            self._trim()
        if isinstance(response, aiohttp.web.Response):
            if raw_request.path.rstrip("/") == "/api/v1":
                response = _fix_core_discovery(response)
            elif response.status >= 500:  # kmock answers its own failures with a traceback: keep it
                self.counts[who][f"http{response.status} {verb} {resource}"] += 1
                body = response.body if isinstance(response.body, bytes) else b""
                print(f"HTTP {response.status} {raw_request.method} {raw_request.path}", file=sys.stderr, flush=True)
                print(body.decode(errors="replace")[-3000:], file=sys.stderr, flush=True)
        return response

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        self._inflight.add(id(request))
        try:
            response = await super()._handle(request)
        finally:
            self._inflight.discard(id(request))
        if self.write_error_rate and request.method in _WRITE_METHODS and response.status < 300:
            driver = any(k.lower() == DRIVER_HEADER.lower() for k in request.headers)
            if not driver and self._random.random() < self.write_error_rate:
                # The write is applied, but the client is told it failed: what an API server does
                # when etcd is slow ("the server was unable to return a response in the time allotted").
                self.counts["operator"]["injected-500-after-write"] += 1
                return aiohttp.web.json_response(
                    {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Timeout", "code": 500},
                    status=500,
                )
        return response

    def _trim(self) -> None:
        """Forget served requests. kmock matches each request to a reaction by scanning every
        request recorded so far (``request in view``), so without this each request costs
        O(requests served): the emulator slows down quadratically over a long run. Requests
        still being handled must stay, or they would match no reaction (HTTP 500)."""
        requests: list[Any] = self._requests
        if len(requests) < _TRIM_AT:
            return
        requests[:] = [r for r in requests if id(r) in self._inflight]
        for payload in self._payloads:
            recorded = getattr(payload, "_requests", None)
            if isinstance(recorded, list):
                recorded.clear()

    def _bench(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw_request.path == "/_bench/reset" and raw_request.method == "POST":
            for counter in self.counts.values():
                counter.clear()
            return aiohttp.web.json_response({"ok": True})
        if raw_request.path == "/_bench/counts":
            return aiohttp.web.json_response({who: dict(counter) for who, counter in self.counts.items()})
        return aiohttp.web.json_response({"error": "unknown bench endpoint"}, status=404)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--namespace", action="append", default=[])
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument(
        "--write-error-rate", type=float, default=0.0, help="Share of non-driver writes applied but answered 500."
    )
    args = parser.parse_args()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    namespaces = ["default", *args.namespace]
    emulator = CountingEmulator(write_error_rate=args.write_error_rate)
    async with serve_cluster(
        crds=[crd_manifest()], namespaces=namespaces, port=args.port, emulator=emulator
    ) as cluster:
        cluster.write_kubeconfig(args.kubeconfig, namespace=namespaces[-1])
        print(f"READY {cluster.url}", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
