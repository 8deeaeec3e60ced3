"""The unmodified operator in its own process, plus a tiny stats endpoint for the bench.

``python bench/operator_main.py (--server-url URL | --kubeconfig FILE) --namespace NS --stats-port P
[--store secret|redis] [--redis-url URL] [--metrics-port P] [--preload FILE]`` runs
:func:`tokensync.cli.run_operator` exactly as ``tokensync run -n NS`` does (same logging setup,
kopf's own SIGTERM handling, settings from ``TOKENSYNC_*`` variables too; the Prometheus
endpoint on a free loopback port rather than 9090), and serves on 127.0.0.1:P:

* ``POST /profile/start`` and ``POST /profile/stop?path=FILE``: cProfile of the event-loop
  thread with a CPU-time clock (``time.process_time``), written as a pstats file. Deterministic
  profiling roughly doubles the cost of function-call-heavy code, so the bench profiles in a
  window of its own, never while it measures.
* ``GET /stats`` -> the controller's own figures: ``kube_requests`` (tokensync's KubeClient
  by ``METHOD resource``; kopf's watch traffic is not in it), ``token_requests``, ``entries``,
  ``pending`` (scheduler heap entries), ``running``, ``due_now``, and ``ready``: every known
  credential is scheduled in the future and nothing runs (the restart readiness signal).

The endpoint costs the operator nothing unless polled; the bench polls it only at phase
boundaries and, briefly, while waiting for readiness after a restart.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import runpy
import time
from typing import Any

import aiohttp.web

from tokensync.cli import run_operator
from tokensync.controller import Controller, load_configuration
from tokensync.handlers import Wiring
from tokensync.models.settings import OperatorSettings


def stats(controller: Controller | None, started: float, controller_at: float | None) -> dict[str, Any]:
    if controller is None:
        return {"started": started, "controller": False}
    scheduler = controller.scheduler
    now = time.time()
    due: dict[Any, float] = scheduler._due
    running = len(scheduler._running)
    due_now = sum(1 for when in due.values() if when <= now)
    entries = len(controller.entries)
    return {
        "started": started,
        "controller": True,
        "controller_at": controller_at,
        "kube_requests": {f"{method} {resource}": n for (method, resource), n in controller.kube.requests.items()},
        "token_requests": controller.token_requests,
        "entries": entries,
        "pending": scheduler.pending,
        "running": running,
        "due_now": due_now,
        "secrets_cached": len(controller.secrets),
        "ready": controller.secrets.synced and running == 0 and due_now == 0 and scheduler.pending == entries,
        "now": now,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--server-url")
    target.add_argument("--kubeconfig")
    parser.add_argument("--namespace", action="append", required=True)
    parser.add_argument("--stats-port", type=int, required=True)
    parser.add_argument("--store", choices=["secret", "redis"], default="secret")
    parser.add_argument("--redis-url")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus port on 127.0.0.1 (0: off).")
    parser.add_argument("--preload", help="A Python file to run first: try a change without editing operator/.")
    args = parser.parse_args()
    if args.preload:
        runpy.run_path(args.preload, run_name="bench_preload")

    started = time.time()
    # As `tokensync run` (cli._setup_logging with the default text format).
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", force=True
    )
    overrides: dict[str, Any] = {"namespaces": list(args.namespace), "default_store": args.store}
    if "metrics_port" in OperatorSettings.model_fields:  # metrics on, as by default, but on a free port
        overrides.update(metrics_port=args.metrics_port, metrics_address="127.0.0.1")
    if args.redis_url:
        overrides["redis_url"] = args.redis_url
    settings = OperatorSettings(**overrides)
    holder: dict[str, Any] = {"controller": None, "at": None}

    def on_controller(controller: Controller) -> None:
        holder["controller"], holder["at"] = controller, time.time()

    if args.server_url:
        wiring = Wiring(settings=settings, server_url=args.server_url, on_controller=on_controller)
    else:
        configuration = load_configuration(args.kubeconfig)
        wiring = Wiring(settings=settings, configuration=configuration, on_controller=on_controller)

    async def handle(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response(stats(holder["controller"], started, holder["at"]))

    async def profile_start(_: aiohttp.web.Request) -> aiohttp.web.Response:
        if holder.get("profiler") is None:
            profiler = holder["profiler"] = cProfile.Profile(time.process_time)
            profiler.enable()
        return aiohttp.web.json_response({"profiling": True})

    async def profile_stop(request: aiohttp.web.Request) -> aiohttp.web.Response:
        profiler: cProfile.Profile | None = holder.pop("profiler", None)
        if profiler is None:
            return aiohttp.web.json_response({"profiling": False}, status=409)
        profiler.disable()
        profiler.dump_stats(request.query["path"])
        return aiohttp.web.json_response({"profiling": False, "path": request.query["path"]})

    app = aiohttp.web.Application()
    app.router.add_get("/stats", handle)
    app.router.add_post("/profile/start", profile_start)
    app.router.add_post("/profile/stop", profile_stop)
    runner = aiohttp.web.AppRunner(app, access_log=None)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", args.stats_port).start()
    try:
        await run_operator(wiring, liveness=None)  # kopf stops it on SIGTERM/SIGINT
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
