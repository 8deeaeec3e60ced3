"""A fast token endpoint for the bench, in its own process (a bench tool, not a test double).

``BENCH_CLIENT_SECRET=S python bench/idp_main.py --port P [--lifetime 3600] [--latency 0] [--error-rate 0]``
prints ``READY <url>`` and serves:

* ``POST /token``: the ``client_credentials`` grant (client_secret_basic or _post). Any
  client id is accepted with the right secret, so that each credential of a run can use
  its own client id and requests can be told apart. Issues opaque random tokens with
  ``expires_in`` = the configured lifetime, after the configured latency; a configured
  fraction of requests gets HTTP 503 instead.
* ``GET /stats``: request counts (total, per status, per client id).
* ``GET /log?since=I``: ``[client_id, unix_time, status]`` of every token request from index I.
* ``POST /config`` with JSON ``{"lifetime": .., "latency": .., "error_rate": ..}``; ``POST /reset``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import secrets
import signal
import time
from collections import Counter
from typing import Any
from urllib.parse import unquote

import aiohttp.web


class TokenEndpoint:
    def __init__(self, client_secret: str, lifetime: float, latency: float, error_rate: float) -> None:
        self.client_secret = client_secret
        self.lifetime = lifetime
        self.latency = latency
        self.error_rate = error_rate
        self.statuses: Counter[int] = Counter()
        self.clients: Counter[str] = Counter()
        self.log: list[tuple[str, float, int]] = []
        self._random = random.Random(1234)

    def _client(self, request: aiohttp.web.Request, form: Any) -> tuple[str | None, str | None]:
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                raw = base64.b64decode(header[6:]).decode()
            except ValueError:
                return None, None
            client_id, _, secret = raw.partition(":")
            return unquote(client_id.replace("+", " ")), unquote(secret.replace("+", " "))
        return form.get("client_id"), form.get("client_secret")

    async def token(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        arrived = time.time()
        form = await request.post()
        client_id, secret = self._client(request, form)
        body: dict[str, Any]
        if self.latency:
            await asyncio.sleep(self.latency)
        if self.error_rate and self._random.random() < self.error_rate:
            status, body = 503, {"error": "temporarily_unavailable"}
        elif form.get("grant_type") != "client_credentials":
            status, body = 400, {"error": "unsupported_grant_type"}
        elif not client_id or secret != self.client_secret:
            status, body = 401, {"error": "invalid_client"}
        else:
            status = 200
            body = {
                "access_token": secrets.token_urlsafe(24),
                "token_type": "Bearer",
                "expires_in": self.lifetime,
            }
        self.statuses[status] += 1
        self.clients[client_id or "-"] += 1
        self.log.append((client_id or "-", arrived, status))
        return aiohttp.web.json_response(body, status=status, headers={"Cache-Control": "no-store"})

    async def stats(self, _: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response(
            {
                "requests": sum(self.statuses.values()),
                "statuses": {str(k): v for k, v in self.statuses.items()},
                "clients": dict(self.clients),
                "config": {"lifetime": self.lifetime, "latency": self.latency, "error_rate": self.error_rate},
            }
        )

    async def get_log(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        since = int(request.query.get("since", "0"))
        return aiohttp.web.json_response({"next": len(self.log), "entries": self.log[since:]})

    async def configure(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        changes = await request.json()
        self.lifetime = float(changes.get("lifetime", self.lifetime))
        self.latency = float(changes.get("latency", self.latency))
        self.error_rate = float(changes.get("error_rate", self.error_rate))
        return await self.stats(request)

    async def reset(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        self.statuses.clear()
        self.clients.clear()
        self.log.clear()
        return await self.stats(request)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--client-secret", default=os.environ.get("BENCH_CLIENT_SECRET"), help="Or BENCH_CLIENT_SECRET."
    )
    parser.add_argument("--lifetime", type=float, default=3600.0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    args = parser.parse_args()
    if not args.client_secret:
        parser.error("set BENCH_CLIENT_SECRET or --client-secret")
    endpoint = TokenEndpoint(args.client_secret, args.lifetime, args.latency, args.error_rate)
    app = aiohttp.web.Application()
    app.router.add_post("/token", endpoint.token)
    app.router.add_get("/stats", endpoint.stats)
    app.router.add_get("/log", endpoint.get_log)
    app.router.add_post("/config", endpoint.configure)
    app.router.add_post("/reset", endpoint.reset)
    runner = aiohttp.web.AppRunner(app, access_log=None)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY http://127.0.0.1:{args.port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
