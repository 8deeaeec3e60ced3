"""tokensync performance bench: one command, separate processes, a markdown table and JSON.

    .venv/bin/python bench/run.py [--scenarios S1,S2,S3,S4,baseline] [--n 100,1000]
                                  [--kubeconfig PATH] [--json out.json] [--profile]
    .venv/bin/python bench/run.py --render out.json     # the tables of an earlier run, again

Processes (each in its own process group, all ended on exit):

* the operator, unmodified (``bench/operator_main.py`` = ``tokensync run -n bench`` plus a
  stats endpoint): its CPU seconds and RSS come from ``/proc/<pid>``;
* the Kubernetes API emulator (``bench/emulator_main.py``), which counts requests by
  client, verb and resource; with ``--kubeconfig`` a real cluster instead (then API
  counts come from the operator's own client and exclude kopf's watch traffic);
* a token endpoint (``bench/idp_main.py``), which counts and logs token requests;
* Redis (``redis-server`` on a free port) for the ``redis`` store variant of S2.

Scenarios:

* S1 burst: N credentials created at once; time until every target Secret holds a token.
* S2 steady refresh: N credentials with short-lived tokens over a window: refreshes/s,
  lateness, token requests, API writes and operator CPU per refresh, expired-token seconds.
* S3 restart with N valid stored credentials: time until all are scheduled again, token
  requests and Secret writes (both must be 0), API requests by verb.
* S4 memory: operator RSS with 0 and N credentials, and its slope over a steady run.
* baseline: a loop per credential running ``curl`` + ``jq`` + ``kubectl apply`` (what teams
  do today), CPU per refresh side by side with the operator's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import resource
import secrets
import shutil
import ssl
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BENCH,
    DRIVER_HEADER,
    ROOT,
    Child,
    Children,
    cpu_seconds,
    cpu_times,
    free_port,
    load_average,
    python,
    rss_bytes,
    system_busy_seconds,
    wait_for_line,
)

from tokensync.controller.schedule import refresh_time
from tokensync.models.credential import GROUP, PLURAL, VERSION, RefreshSpec
from tokensync.models.settings import OperatorSettings
from tokensync.models.tokens import TokenSet

CR_PATH = f"/apis/{GROUP}/{VERSION}"
ROLE = "tokensync.dev/role"
CLIENT_SECRET_NAME = "bench-client"
WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")
KIB = 1024
ALL_SCENARIOS = ("S1", "S2", "S3", "S4", "baseline")


# -- options ----------------------------------------------------------------------------------


@dataclass
class Options:
    scenarios: list[str]
    sizes: list[int]
    steady_n: int
    steady_lifetime: float
    steady_seconds: float
    soak_seconds: float
    backends: list[str]
    baseline_loops: int
    baseline_refreshes: int
    idp_latency: float
    idp_error_rate: float
    kubeconfig: Path | None
    json_path: Path | None
    results: Path
    profile: bool
    profiler: str
    profile_seconds: float
    create_concurrency: int
    operator_env: dict[str, str]
    api_write_error_rate: float
    operator_preload: Path | None


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", default=",".join(ALL_SCENARIOS), help="Comma-separated: S1,S2,S3,S4,baseline.")
    parser.add_argument("--n", default="100,1000", help="Credential counts for S1, S3 and S4 (default 100,1000).")
    parser.add_argument("--steady-n", type=int, default=200, help="Credentials in the S2 steady run (default 200).")
    parser.add_argument("--steady-lifetime", type=float, default=20.0, help="Token lifetime in S2, s (default 20).")
    parser.add_argument("--steady-seconds", type=float, default=60.0, help="S2 measurement window, s (default 60).")
    parser.add_argument(
        "--soak-seconds",
        type=float,
        default=120.0,
        help="With S4: the secret-backend steady run lasts at least this long for the RSS slope (default 120).",
    )
    parser.add_argument("--backends", default="secret,redis", help="Store backends for S2 (default secret,redis).")
    parser.add_argument("--baseline-loops", type=int, default=4, help="Baseline: concurrent loops (credentials).")
    parser.add_argument("--baseline-refreshes", type=int, default=20, help="Baseline: refreshes in total.")
    parser.add_argument("--idp-latency", type=float, default=0.0, help="Token endpoint latency, s (default 0).")
    parser.add_argument("--idp-error-rate", type=float, default=0.0, help="Share of token requests answered 503.")
    parser.add_argument(
        "--api-write-error-rate",
        type=float,
        default=0.0,
        help="Emulator only: answer this share of the operator's writes with HTTP 500 after applying them.",
    )
    parser.add_argument("--kubeconfig", type=Path, default=None, help="A real cluster instead of the emulator.")
    parser.add_argument("--json", dest="json_path", type=Path, default=None, help="Also write every figure here.")
    parser.add_argument("--results", type=Path, default=None, help="Logs and profiles (default bench/results/<time>).")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="Also profile the operator, in windows of their own after the measurements: "
        "a burst of more credentials (S1) and an extra steady window (S2).",
    )
    parser.add_argument(
        "--profiler",
        choices=["cprofile", "py-spy"],
        default="cprofile",
        help="cprofile: in-process, CPU clock (default); py-spy: sampling from outside (pip install py-spy).",
    )
    parser.add_argument("--profile-seconds", type=float, default=30.0, help="Length of the extra S2 profile window.")
    parser.add_argument("--create-concurrency", type=int, default=16, help="Concurrent creates in S1 (default 16).")
    parser.add_argument(
        "--operator-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Environment of the operator process only (repeatable), e.g. TOKENSYNC_CONCURRENCY=64.",
    )
    parser.add_argument(
        "--operator-preload",
        type=Path,
        default=None,
        help="A Python file the operator process runs before it starts: try a change without editing operator/.",
    )
    args = parser.parse_args(argv)
    bad_env = [item for item in args.operator_env if "=" not in item]
    if bad_env:
        parser.error(f"--operator-env takes KEY=VALUE, not {bad_env[0]!r}")
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - set(ALL_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if set(backends) - {"secret", "redis"}:
        parser.error("--backends takes secret and/or redis")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Options(
        scenarios=scenarios,
        sizes=[int(n) for n in args.n.split(",") if n.strip()],
        steady_n=args.steady_n,
        steady_lifetime=args.steady_lifetime,
        steady_seconds=args.steady_seconds,
        soak_seconds=args.soak_seconds,
        backends=backends,
        baseline_loops=args.baseline_loops,
        baseline_refreshes=args.baseline_refreshes,
        idp_latency=args.idp_latency,
        idp_error_rate=args.idp_error_rate,
        kubeconfig=args.kubeconfig.resolve() if args.kubeconfig else None,
        json_path=args.json_path,
        results=(args.results or BENCH / "results" / stamp).resolve(),
        profile=args.profile,
        profiler=args.profiler,
        profile_seconds=args.profile_seconds,
        create_concurrency=args.create_concurrency,
        operator_env=dict(item.split("=", 1) for item in args.operator_env),
        api_write_error_rate=args.api_write_error_rate,
        operator_preload=args.operator_preload.resolve() if args.operator_preload else None,
    )


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the driver's own API client ------------------------------------------------------------------


class Api:
    """The bench driver's HTTP client to the cluster; every request says ``X-Bench-Driver: 1``."""

    def __init__(self, http: httpx.AsyncClient, *, emulator: bool) -> None:
        self.http = http
        self.emulator = emulator

    @classmethod
    def for_emulator(cls, url: str) -> Api:
        http = httpx.AsyncClient(base_url=url, headers={DRIVER_HEADER: "1"}, timeout=httpx.Timeout(120.0))
        return cls(http, emulator=True)

    @classmethod
    def for_kubeconfig(cls, path: Path) -> Api:
        from tokensync.controller import bearer_header, load_configuration

        configuration = load_configuration(str(path))
        verify: ssl.SSLContext | bool = False
        if configuration.verify_ssl:
            context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
            if configuration.cert_file:
                context.load_cert_chain(configuration.cert_file, configuration.key_file)
            verify = context
        headers = {DRIVER_HEADER: "1"}
        if (header := bearer_header(configuration)) is not None:
            headers["Authorization"] = header
        http = httpx.AsyncClient(
            base_url=configuration.host, headers=headers, verify=verify, timeout=httpx.Timeout(120.0)
        )
        return cls(http, emulator=False)

    async def close(self) -> None:
        await self.http.aclose()

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.http.request(method, path, **kwargs)
        if response.status_code >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code} {response.text[:300]}")
        return response.json() if response.content else None

    async def ensure_crd(self) -> None:
        from tokensync.models.crd import CRD_NAME, crd_manifest

        path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}"
        if (await self.http.get(path)).status_code == 404:
            await self._json("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd_manifest())
        for _ in range(120):
            body = (await self.http.get(path)).json()
            conditions = (body.get("status") or {}).get("conditions") or []
            if any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
                return
            await asyncio.sleep(0.5)
        raise RuntimeError(f"CRD {CRD_NAME} was not established")

    async def create_namespace(self, name: str) -> None:
        response = await self.http.post("/api/v1/namespaces", json={"metadata": {"name": name}})
        if response.status_code not in (201, 200, 409):
            raise RuntimeError(f"cannot create namespace {name}: HTTP {response.status_code} {response.text[:200]}")

    async def delete_namespace(self, name: str) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await self.http.delete(f"/api/v1/namespaces/{name}")

    async def create_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }
        await self._json("POST", f"/api/v1/namespaces/{namespace}/secrets", json=body)

    async def create_credential(self, namespace: str, name: str, token_url: str) -> str:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "OAuthCredential",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "issuer": {"tokenURL": token_url},
                "grant": {
                    "type": "client_credentials",
                    "clientID": name,
                    "clientSecretRef": {"name": CLIENT_SECRET_NAME, "key": "client-secret"},
                },
            },
        }
        created = await self._json("POST", f"{CR_PATH}/namespaces/{namespace}/{PLURAL}", json=body)
        return str(created["metadata"]["uid"])

    async def list_secrets(self, namespace: str, role: str) -> list[dict[str, Any]]:
        page = await self._json(
            "GET", f"/api/v1/namespaces/{namespace}/secrets", params={"labelSelector": f"{ROLE}={role}"}
        )
        return list(page.get("items") or [])

    async def list_credentials(self, namespace: str) -> list[dict[str, Any]]:
        page = await self._json("GET", f"{CR_PATH}/namespaces/{namespace}/{PLURAL}")
        return list(page.get("items") or [])

    async def counts(self) -> dict[str, dict[str, int]] | None:
        if not self.emulator:
            return None
        result: dict[str, dict[str, int]] = await self._json("GET", "/_bench/counts")
        return result

    async def reset_counts(self) -> None:
        if self.emulator:
            await self._json("POST", "/_bench/reset")


# -- processes ------------------------------------------------------------------------------------


@dataclass
class Operator:
    child: Child
    stats_url: str
    spawned: float


@dataclass
class Meter:
    """CPU used by this run's processes vs the whole machine over a phase: the noise figure."""

    wall: float = 0.0
    busy: float = 0.0
    self_cpu: float = 0.0
    children_cpu: float = 0.0
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @classmethod
    def now(cls) -> Meter:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(
            wall=time.monotonic(),
            busy=system_busy_seconds()[0],
            self_cpu=me.ru_utime + me.ru_stime,
            children_cpu=kids.ru_utime + kids.ru_stime,
            load=load_average(),
        )


def noise(start: Meter, end: Meter, alive_cpu: float) -> dict[str, Any]:
    """How much CPU processes outside this run used during a phase (2 cores = 2.0)."""
    wall = max(1e-6, end.wall - start.wall)
    ours = (end.self_cpu - start.self_cpu) + (end.children_cpu - start.children_cpu) + alive_cpu
    busy = end.busy - start.busy
    return {
        "wall_s": round(wall, 1),
        "machine_busy_cores": round(busy / wall, 2),
        "bench_cores": round(ours / wall, 2),
        "other_cores": round(max(0.0, busy - ours) / wall, 2),
        "load_start": [round(v, 2) for v in start.load],
        "load_end": [round(v, 2) for v in end.load],
    }


class Stack:
    """One environment: API server (emulator or real), token endpoint, optional Redis, operator."""

    def __init__(self, opts: Options, name: str, *, lifetime: float) -> None:
        self.opts = opts
        self.name = name
        self.lifetime = lifetime
        self.dir = opts.results / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.children = Children(self.dir)
        self.client_secret = secrets.token_urlsafe(24)
        self.namespace = "bench" if opts.kubeconfig is None else f"tokensync-bench-{secrets.token_hex(3)}"
        self.api: Api | None = None
        self.idp: httpx.AsyncClient | None = None
        self.idp_url = ""
        self.server_url = ""
        self.kubeconfig: Path = opts.kubeconfig or self.dir / "kubeconfig.json"
        self.emulator: Child | None = None
        self.idp_child: Child | None = None
        self.redis: Child | None = None
        self.redis_url: str | None = None
        self.operator: Operator | None = None
        self._operator_seq = 0

    # lifecycle

    async def start(self, *, redis: bool = False) -> None:
        if self.opts.kubeconfig is None:
            port = free_port()
            argv = [python(), str(BENCH / "emulator_main.py"), "--port", str(port), "--namespace", self.namespace]
            argv += ["--kubeconfig", str(self.kubeconfig), "--write-error-rate", str(self.opts.api_write_error_rate)]
            self.emulator = self.children.start("emulator", argv)
            self.server_url = wait_for_line(self.emulator, "READY ")
            self.api = Api.for_emulator(self.server_url)
        else:
            self.api = Api.for_kubeconfig(self.opts.kubeconfig)
            await self.api.ensure_crd()
            await self.api.create_namespace(self.namespace)
        idp_port = free_port()
        argv = [python(), str(BENCH / "idp_main.py"), "--port", str(idp_port), "--lifetime", str(self.lifetime)]
        argv += ["--latency", str(self.opts.idp_latency), "--error-rate", str(self.opts.idp_error_rate)]
        self.idp_child = self.children.start("idp", argv, env={"BENCH_CLIENT_SECRET": self.client_secret})
        self.idp_url = wait_for_line(self.idp_child, "READY ")
        self.idp = httpx.AsyncClient(base_url=self.idp_url, timeout=httpx.Timeout(30.0))
        if redis:
            await self._start_redis()
        await self.api.create_secret(self.namespace, CLIENT_SECRET_NAME, {"client-secret": self.client_secret})

    async def _start_redis(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed (bash scripts/ensure-redis installs it)")
        port = free_port()
        argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.dir)]
        self.redis = self.children.start("redis", argv)
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        import redis as redis_lib

        client = redis_lib.Redis.from_url(self.redis_url)
        try:
            for _ in range(200):
                with contextlib.suppress(redis_lib.ConnectionError):
                    if client.ping():
                        return
                await asyncio.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError(f"redis-server did not answer:\n{self.redis.log_tail()}")

    async def start_operator(self, *, store: str = "secret") -> Operator:
        port = free_port()
        self._operator_seq += 1
        argv = [python(), str(BENCH / "operator_main.py"), "--namespace", self.namespace, "--stats-port", str(port)]
        argv += ["--store", store, "--metrics-port", str(free_port())]
        if self.opts.operator_preload is not None:
            argv += ["--preload", str(self.opts.operator_preload)]
        argv += (
            ["--server-url", self.server_url]
            if self.opts.kubeconfig is None
            else ["--kubeconfig", str(self.kubeconfig)]
        )
        if store == "redis":
            assert self.redis_url is not None
            argv += ["--redis-url", self.redis_url]
        spawned = time.time()
        child = self.children.start(f"operator-{self._operator_seq}", argv, env=self.opts.operator_env)
        self.operator = Operator(child, f"http://127.0.0.1:{port}/stats", spawned)
        return self.operator

    async def stop_operator(self) -> float:
        """SIGTERM (kopf's graceful stop); returns the seconds it took to exit."""
        assert self.operator is not None
        started = time.monotonic()
        await asyncio.to_thread(self.children.stop, self.operator.child, timeout=30.0)
        self.operator = None
        return time.monotonic() - started

    async def close(self) -> None:
        if self.api is not None:
            if self.opts.kubeconfig is not None:
                await self.api.delete_namespace(self.namespace)
            await self.api.close()
        if self.idp is not None:
            await self.idp.aclose()
        await asyncio.to_thread(self.children.stop_all)

    # readings

    def alive_cpu(self) -> float:
        total = 0.0
        for child in (self.emulator, self.idp_child, self.redis, self.operator.child if self.operator else None):
            if child is not None and child.alive():
                with contextlib.suppress(OSError):
                    total += cpu_seconds(child.pid)
        return total

    def operator_warnings(self) -> int:
        """WARNING and ERROR lines in every operator log of this stack (failed renewals, retries)."""
        total = 0
        for path in self.dir.glob("operator-*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if " WARNING " in line or " ERROR " in line:
                    total += 1
        return total

    def operator_cpu(self) -> float:
        assert self.operator is not None
        return cpu_seconds(self.operator.child.pid)

    def operator_rss(self) -> int:
        assert self.operator is not None
        return rss_bytes(self.operator.child.pid)

    def emulator_cpu(self) -> float | None:
        return cpu_seconds(self.emulator.pid) if self.emulator is not None and self.emulator.alive() else None

    async def operator_stats(self, timeout: float = 5.0) -> dict[str, Any]:
        assert self.operator is not None
        async with httpx.AsyncClient(timeout=timeout) as http:
            result: dict[str, Any] = (await http.get(self.operator.stats_url)).json()
            return result

    async def wait_operator(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, interval: float = 0.05
    ) -> dict[str, Any]:
        assert self.operator is not None
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        async with httpx.AsyncClient(timeout=5.0) as http:
            while time.monotonic() < deadline:
                if not self.operator.child.alive():
                    raise RuntimeError(f"the operator exited:\n{self.operator.child.log_tail(40)}")
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    last = (await http.get(self.operator.stats_url)).json()
                    if predicate(last):
                        return last
                await asyncio.sleep(interval)
        raise RuntimeError(f"operator condition not reached within {timeout}s; last stats: {last}")

    async def idp_stats(self) -> dict[str, Any]:
        assert self.idp is not None
        result: dict[str, Any] = (await self.idp.get("/stats")).json()
        return result

    async def idp_log(self, since: int = 0) -> tuple[int, list[tuple[str, float, int]]]:
        assert self.idp is not None
        body = (await self.idp.get("/log", params={"since": str(since)})).json()
        return int(body["next"]), [(str(c), float(t), int(code)) for c, t, code in body["entries"]]

    async def idp_reset(self) -> None:
        assert self.idp is not None
        await self.idp.post("/reset")

    async def api_counts(self) -> dict[str, int]:
        """Requests by "verb resource" from everyone but the driver (emulator) or the operator's client."""
        assert self.api is not None
        counts = await self.api.counts()
        if counts is not None:
            return dict(counts.get("operator") or {})
        stats = await self.operator_stats()
        verbs = {"GET": "get|list", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
        result: dict[str, int] = {}
        for key, n in (stats.get("kube_requests") or {}).items():
            method, _, res = key.partition(" ")
            result[f"{verbs.get(method, method)} {res}"] = n
        return result


def counts_delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    keys = set(after) | set(before)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in keys}
    return {k: v for k, v in sorted(delta.items()) if v}


def writes(counts: dict[str, int], resource_prefix: str = "") -> int:
    return sum(
        n
        for k, n in counts.items()
        if k.split(" ")[0] in WRITE_VERBS and k.split(" ", 1)[1].startswith(resource_prefix)
    )


def per(counts: dict[str, int], denominator: float) -> dict[str, float]:
    return {k: round(v / denominator, 3) for k, v in counts.items()} if denominator else {}


# -- shared steps ---------------------------------------------------------------------------------


async def create_credentials(stack: Stack, n: int, *, concurrency: int, offset: int = 0) -> dict[str, str]:
    """Create N credentials as fast as the API server takes them; returns name -> uid."""
    assert stack.api is not None
    api, token_url = stack.api, f"{stack.idp_url}/token"
    slots = asyncio.Semaphore(concurrency)
    uids: dict[str, str] = {}

    async def one(i: int) -> None:
        name = f"cred-{i:05d}"
        async with slots:
            uids[name] = await api.create_credential(stack.namespace, name, token_url)

    await asyncio.gather(*(one(offset + i) for i in range(n)))
    return uids


def _secret_value(body: dict[str, Any], key: str) -> str | None:
    encoded = (body.get("data") or {}).get(key)
    return base64.b64decode(encoded).decode() if isinstance(encoded, str) else None


async def wait_targets(stack: Stack, n: int, timeout: float) -> float:
    """Poll labelled LISTs until N target Secrets hold a token; returns the time.monotonic() then."""
    assert stack.api is not None
    interval = 0.25 if n <= 200 else 0.5 if n <= 1000 else 1.0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = await stack.api.list_secrets(stack.namespace, "target")
        if sum(1 for item in items if _secret_value(item, "access_token")) >= n:
            return time.monotonic()
        await asyncio.sleep(interval)
    raise RuntimeError(f"not every target Secret held a token within {timeout}s")


async def settle(stack: Stack, n: int, timeout: float = 120.0, quiet: float = 1.5) -> None:
    """Until the operator is idle with N scheduled credentials and the API traffic stopped."""
    await stack.wait_operator(lambda s: bool(s.get("ready")) and s.get("entries") == n, timeout, interval=0.2)
    deadline = time.monotonic() + timeout
    previous = await stack.api_counts()
    since = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        current = await stack.api_counts()
        if current != previous:
            previous, since = current, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    raise RuntimeError("API traffic did not settle")


async def rss_settled(stack: Stack, samples: int = 5, interval: float = 0.4) -> int:
    values = []
    for _ in range(samples):
        values.append(stack.operator_rss())
        await asyncio.sleep(interval)
    return int(statistics.median(values))


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


async def profile(stack: Stack, seconds: float, label: str, kind: str) -> dict[str, Any] | None:
    """Profile the operator for ``seconds``: cProfile (CPU clock, in-process) or py-spy (sampling)."""
    assert stack.operator is not None
    cpu0 = stack.operator_cpu()
    if kind == "cprofile":
        out = stack.dir / f"profile-{label}.pstats"
        base = stack.operator.stats_url.rsplit("/", 1)[0]
        async with httpx.AsyncClient(timeout=60.0) as http:
            await http.post(f"{base}/profile/start")
            await asyncio.sleep(seconds)
            await http.post(f"{base}/profile/stop", params={"path": str(out)})
        summary = summarize_pstats(out)
    else:
        exe = py_spy()
        if exe is None:
            log("py-spy not found: pip install py-spy (or use --profiler cprofile)")
            return None
        out = stack.dir / f"profile-{label}.txt"
        argv = [exe, "record", "--pid", str(stack.operator.child.pid), "--duration", str(int(seconds))]
        argv += ["--rate", "250", "--format", "raw", "--nonblocking", "--output", str(out)]
        child = stack.children.start(f"py-spy-{label}", argv)
        for _ in range(int(seconds * 10) + 300):
            if not child.alive():
                break
            await asyncio.sleep(0.1)
        stack.children.stop(child)
        if not out.exists():
            log(f"py-spy wrote nothing: {child.log_tail()}")
            return None
        summary = summarize_py_spy(out)
    summary["operator_cpu_s"] = round(stack.operator_cpu() - cpu0, 2)
    summary["seconds"] = seconds
    return summary


def _short_path(path: str) -> str:
    parts = Path(path).parts
    for marker in ("site-packages", "operator", "lib"):
        if marker in parts:
            parts = parts[parts.index(marker) + 1 :]
            break
    return "/".join(parts[-3:]) if parts else path


def summarize_pstats(path: Path, top: int = 30) -> dict[str, Any]:
    import pstats

    stats: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in stats.values()) or 1e-9

    def name(key: tuple[str, int, str]) -> str:
        filename, line, func = key
        return func if filename == "~" else f"{func} ({_short_path(filename)}:{line})"

    by_self = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    by_cum = sorted(stats.items(), key=lambda kv: -kv[1][3])[:top]
    return {
        "profiler": "cProfile (process_time)",
        "file": str(path),
        "profiled_cpu_s": round(total, 3),
        "self_pct": [(name(k), round(100 * v[2] / total, 1), v[1]) for k, v in by_self],
        "inclusive_pct": [(name(k), round(100 * v[3] / total, 1), v[1]) for k, v in by_cum],
    }


def _frame_name(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (package/file.py)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    for marker in ("site-packages", "operator", "lib"):
        if marker in parts:
            parts = parts[parts.index(marker) + 1 :]
            break
    short = "/".join(parts[-3:]) if parts else path
    return f"{name} ({short})"


def summarize_py_spy(path: Path, top: int = 25) -> dict[str, Any]:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith(("<module>", "run (", "_run_once", "run_forever", "run_until"))]
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def pct(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100.0 * n / total, 1)) for name, n in counter.most_common(top)] if total else []

    return {
        "profiler": "py-spy (sampling, non-blocking)",
        "file": str(path),
        "samples": total,
        "self_pct": pct(self_time),
        "inclusive_pct": pct(inclusive),
    }


# -- S1 burst, S3 restart, S4 memory ---------------------------------------------------------------


async def burst_phase(opts: Options, n: int) -> dict[str, Any]:
    """S1 (burst), then S3 (restart) and the S4 RSS points, on one fresh stack of size N."""
    stack = Stack(opts, f"burst-{n}", lifetime=3600.0)
    meter = Meter.now()
    result: dict[str, Any] = {"n": n}
    try:
        await stack.start()
        await stack.start_operator()
        await stack.wait_operator(lambda s: bool(s.get("ready")), 60.0)
        await asyncio.sleep(2.0)  # kopf's watches up, imports done
        result["rss_empty"] = await rss_settled(stack)
        assert stack.api is not None

        # S1: burst
        await stack.idp_reset()
        before = await stack.api_counts()
        cpu0, emu0 = stack.operator_cpu(), stack.emulator_cpu()
        t0 = time.monotonic()
        uids = await create_credentials(stack, n, concurrency=opts.create_concurrency)
        t_created = time.monotonic()
        t_tokens = await wait_targets(stack, n, timeout=120.0 + n * 1.0)
        cpu_tokens = stack.operator_cpu()
        await settle(stack, n)
        t_settled = time.monotonic()
        cpu1, emu1 = stack.operator_cpu(), stack.emulator_cpu()
        idp = await stack.idp_stats()
        api = counts_delta(await stack.api_counts(), before)
        result["s1"] = {
            "create_s": round(t_created - t0, 2),
            "create_per_s": round(n / max(1e-6, t_created - t0), 1),
            "all_tokens_s": round(t_tokens - t0, 2),
            "after_last_create_s": round(t_tokens - t_created, 2),
            "settled_s": round(t_settled - t0, 2),
            "token_requests": idp["requests"],
            "token_requests_per_cr": round(idp["requests"] / n, 3),
            "api_requests": api,
            "api_writes_per_cr": round(writes(api) / n, 3),
            "api_per_cr": per(api, n),
            "operator_cpu_s": round(cpu1 - cpu0, 2),
            "operator_cpu_ms_per_cr": round(1000 * (cpu1 - cpu0) / n, 2),
            "operator_cpu_to_tokens_s": round(cpu_tokens - cpu0, 2),
            "emulator_cpu_s": round(emu1 - emu0, 2) if emu0 is not None and emu1 is not None else None,
            "uids": len(uids),
        }
        result["rss_burst"] = await rss_settled(stack)

        # S3: restart with N valid stored credentials
        if "S3" in opts.scenarios or "S4" in opts.scenarios:
            await stack.idp_reset()
            before = await stack.api_counts()
            result["s3_stop_s"] = round(await stack.stop_operator(), 2)
            operator = await stack.start_operator()
            if not stack.api.emulator:
                before = {}  # the operator's own counters started again
            ready = await stack.wait_operator(
                lambda s: bool(s.get("ready")) and s.get("entries") == n, timeout=120.0 + n * 0.2
            )
            t_ready = time.time()
            cpu_ready = stack.operator_cpu()
            await asyncio.sleep(3.0)  # anything a restart would do late shows up here
            idp = await stack.idp_stats()
            api = counts_delta(await stack.api_counts(), before)
            secret_writes = writes(api, "secrets")
            result["s3"] = {
                "ready_s_from_spawn": round(t_ready - operator.spawned, 2),
                "ready_s_from_controller": round(t_ready - float(ready.get("controller_at") or t_ready), 2),
                "token_requests": idp["requests"],
                "secret_writes": secret_writes,
                "all_writes": writes(api),
                "api_requests": api,
                "operator_cpu_to_ready_s": round(cpu_ready, 2),
                "operator_kube_requests": ready.get("kube_requests"),
            }
            result["rss_restart"] = await rss_settled(stack)
        if opts.profile:
            extra = min(n, 200)
            log(f"burst N={n}: profiling a burst of {extra} more credentials (not part of the figures)")
            base = stack.operator.stats_url.rsplit("/", 1)[0] if stack.operator else ""
            out = stack.dir / f"profile-burst-{n}.pstats"
            cpu_before = stack.operator_cpu()
            async with httpx.AsyncClient(timeout=60.0) as http:
                await http.post(f"{base}/profile/start")
                await create_credentials(stack, extra, concurrency=opts.create_concurrency, offset=n)
                await wait_targets(stack, n + extra, timeout=120.0 + extra)
                await settle(stack, n + extra)
                await http.post(f"{base}/profile/stop", params={"path": str(out)})
            result["profile"] = summarize_pstats(out)
            result["profile"]["credentials"] = extra
            result["profile"]["operator_cpu_s"] = round(stack.operator_cpu() - cpu_before, 2)
        result["operator_warnings"] = stack.operator_warnings()
        result["noise"] = noise(meter, Meter.now(), stack.alive_cpu())
    finally:
        await stack.close()
    return result


# -- S2 steady refresh (and the S4 soak) -------------------------------------------------------------


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass
class Sampler:
    """Every token set seen per credential (from the store), and expired-token time in targets."""

    stack: Stack
    backend: str
    names: list[str]
    token_sets: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)  # name -> issued -> (iss, exp)
    expiry_of: dict[str, float] = field(default_factory=dict)  # access token -> exact expiry
    expired_seconds: float = 0.0
    expired_secrets: set[str] = field(default_factory=set)
    samples: int = 0
    rss: list[tuple[float, int]] = field(default_factory=list)
    _last: float | None = None

    def _record(self, name: str, stored: dict[str, Any]) -> None:
        token_set = stored.get("token_set") or {}
        issued, expires = _parse_time(token_set.get("issued_at")), _parse_time(token_set.get("expires_at"))
        if issued is None or expires is None:
            return
        self.token_sets.setdefault(name, {})[token_set["issued_at"]] = (issued.timestamp(), expires.timestamp())
        if token_set.get("access_token"):
            self.expiry_of[token_set["access_token"]] = expires.timestamp()

    async def _states(self) -> None:
        assert self.stack.api is not None
        if self.backend == "secret":
            for item in await self.stack.api.list_secrets(self.stack.namespace, "state"):
                name = ((item.get("metadata") or {}).get("annotations") or {}).get("tokensync.dev/credential")
                raw = _secret_value(item, "state")
                if name and raw:
                    self._record(name, json.loads(raw))
        else:
            import redis as redis_lib

            assert self.stack.redis_url is not None
            client = redis_lib.Redis.from_url(self.stack.redis_url)
            try:
                keys = [f"tokensync:{self.stack.namespace}/{name}" for name in self.names]
                values = await asyncio.to_thread(client.mget, keys)
            finally:
                client.close()
            for name, blob in zip(self.names, values, strict=True):
                if blob is not None:
                    self._record(name, json.loads(blob))

    async def tick(self) -> None:
        assert self.stack.api is not None
        await self._states()
        now = time.time()
        targets = await self.stack.api.list_secrets(self.stack.namespace, "target")
        step = 0.0 if self._last is None else now - self._last
        self._last = now
        self.samples += 1
        for item in targets:
            token = _secret_value(item, "access_token")
            expires = self.expiry_of.get(token or "")
            if expires is None:  # not seen in the store yet: the Secret's own stamp (to the second)
                stamp = _parse_time(_secret_value(item, "expires_at"))
                expires = stamp.timestamp() + 1.0 if stamp else None
            if expires is not None and now > expires:
                self.expired_seconds += min(step, now - expires)
                self.expired_secrets.add(item["metadata"]["name"])
        self.rss.append((now, self.stack.operator_rss()))


def lateness(
    sampler: Sampler, arrivals: dict[str, list[float]], uids: dict[str, str], window: tuple[float, float], jitter: float
) -> list[float]:
    """Seconds from each scheduled refresh (the operator's own refresh_time of the stored token set)
    to the arrival of the next token request for that credential at the token endpoint."""
    spec = RefreshSpec()
    result: list[float] = []
    for name, sets in sampler.token_sets.items():
        times = sorted(arrivals.get(name, []))
        for issued, expires in sets.values():
            token_set = TokenSet.model_validate(
                {
                    "access_token": "x",
                    "issued_at": datetime.fromtimestamp(issued, UTC),
                    "expires_at": datetime.fromtimestamp(expires, UTC),
                }
            )
            due = refresh_time(token_set, spec, identity=uids[name], jitter_fraction=jitter).timestamp()
            if not window[0] <= due <= window[1] - 5.0:
                continue
            following = next((t for t in times if t > issued), None)
            result.append((following if following is not None else window[1]) - due)
    return result


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def slope_per_minute(points: list[tuple[float, int]]) -> float | None:
    if len(points) < 3:
        return None
    xs = [t for t, _ in points]
    ys = [float(v) for _, v in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 60.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else None


async def steady_phase(opts: Options, backend: str, duration: float, *, soak: bool) -> dict[str, Any]:
    n, lifetime = opts.steady_n, opts.steady_lifetime
    stack = Stack(opts, f"steady-{backend}", lifetime=lifetime)
    meter = Meter.now()
    result: dict[str, Any] = {"backend": backend, "n": n, "lifetime_s": lifetime, "soak": soak}
    try:
        await stack.start(redis=backend == "redis")
        await stack.start_operator(store=backend)
        await stack.wait_operator(lambda s: bool(s.get("ready")), 60.0)
        assert stack.api is not None
        uids = await create_credentials(stack, n, concurrency=opts.create_concurrency)
        await wait_targets(stack, n, timeout=120.0 + n)
        log(f"steady/{backend}: {n} credentials hold tokens; warming up for two lifetimes ({2 * lifetime:.0f}s)")
        await asyncio.sleep(2 * lifetime)
        sampler = Sampler(stack, backend, sorted(uids))

        def idle(stats: dict[str, Any]) -> bool:
            return stats.get("running") == 0 and stats.get("due_now") == 0

        async def boundary() -> tuple[float, float, int, dict[str, int], int]:
            await stack.wait_operator(idle, 30.0, interval=0.1)
            crs = await stack.api.list_credentials(stack.namespace)  # type: ignore[union-attr]
            refreshes = sum(int((c.get("status") or {}).get("refreshCount") or 0) for c in crs)
            idp = await stack.idp_stats()
            return time.time(), stack.operator_cpu(), refreshes, await stack.api_counts(), int(idp["requests"])

        t0, cpu0, refresh0, api0, idp0 = await boundary()
        assert stack.operator is not None
        user0, sys0 = cpu_times(stack.operator.child.pid)
        emu0 = stack.emulator_cpu()
        log_index, _ = await stack.idp_log()
        log(f"steady/{backend}: measuring for {duration:.0f}s")
        while time.time() - t0 < duration:
            tick = time.monotonic()
            await sampler.tick()
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        t1, cpu1, refresh1, api1, idp1 = await boundary()
        user1, sys1 = cpu_times(stack.operator.child.pid)
        emu1 = stack.emulator_cpu()
        await sampler.tick()
        _, entries = await stack.idp_log(log_index)
        arrivals: dict[str, list[float]] = {}
        for client_id, arrived, _status in entries:
            arrivals.setdefault(client_id, []).append(arrived)
        refreshes = refresh1 - refresh0
        token_requests = idp1 - idp0
        api = counts_delta(api1, api0)
        late = lateness(sampler, arrivals, uids, (t0, t1), OperatorSettings().jitter_fraction)
        rss = sampler.rss
        third = max(1, len(rss) // 3)
        result.update(
            {
                "window_s": round(t1 - t0, 1),
                "refreshes": refreshes,
                "refreshes_per_s": round(refreshes / (t1 - t0), 2),
                "token_requests": token_requests,
                "token_requests_per_refresh": round(token_requests / refreshes, 3) if refreshes else None,
                "api_requests": api,
                "api_writes_per_refresh": round(writes(api) / refreshes, 3) if refreshes else None,
                "api_per_refresh": per(api, refreshes),
                "operator_cpu_s": round(cpu1 - cpu0, 2),
                "operator_cpu_ms_per_refresh": round(1000 * (cpu1 - cpu0) / refreshes, 2) if refreshes else None,
                "operator_cpu_cores": round((cpu1 - cpu0) / (t1 - t0), 3),
                "operator_user_ms_per_refresh": round(1000 * (user1 - user0) / refreshes, 2) if refreshes else None,
                "operator_sys_ms_per_refresh": round(1000 * (sys1 - sys0) / refreshes, 2) if refreshes else None,
                "emulator_cpu_cores": round((emu1 - emu0) / (t1 - t0), 3) if emu0 is not None and emu1 else None,
                "lateness_samples": len(late),
                "lateness_p50_s": _round(percentile(late, 50)),
                "lateness_p99_s": _round(percentile(late, 99)),
                "lateness_max_s": _round(max(late) if late else None),
                "expired_token_seconds": round(sampler.expired_seconds, 2),
                "operator_warnings": stack.operator_warnings(),
                "expired_secrets": len(sampler.expired_secrets),
                "samples": sampler.samples,
                "rss_start": rss[0][1] if rss else None,
                "rss_end": rss[-1][1] if rss else None,
                "rss_max": max(v for _, v in rss) if rss else None,
                "rss_slope_kib_per_min": _round((s / KIB) if (s := slope_per_minute(rss)) is not None else None, 1),
                "rss_series_kib": [(round(t - t0), v // KIB) for t, v in rss[::5]],
                "rss_growth_first_to_last_third_kib": round(
                    (statistics.median(v for _, v in rss[-third:]) - statistics.median(v for _, v in rss[:third]))
                    / KIB,
                    1,
                )
                if rss
                else None,
            }
        )
        if opts.profile:
            log(f"steady/{backend}: profiling for {opts.profile_seconds:.0f}s (not part of the figures)")
            result["profile"] = await profile(stack, opts.profile_seconds, f"steady-{backend}", opts.profiler)
        result["noise"] = noise(meter, Meter.now(), stack.alive_cpu())
    finally:
        await stack.close()
    return result


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# -- baseline ----------------------------------------------------------------------------------------

BASELINE_SCRIPT = r"""
set -eu
name="$1"; rounds="$2"
for i in $(seq 1 "$rounds"); do
  token=$(curl -sf -u "$name:$CLIENT_SECRET" -d grant_type=client_credentials "$TOKEN_URL" | jq -r .access_token)
  body='{"apiVersion":"v1","kind":"Secret","metadata":{"name":"%s","namespace":"%s"},"stringData":{"access_token":"%s"}}'
  printf "$body" "$name" "$NAMESPACE" "$token" | kubectl --kubeconfig "$KUBECONFIG_FILE" --cache-dir "$CACHE_DIR" \
    apply --validate=false -f - >/dev/null
done
"""


async def baseline_phase(opts: Options) -> dict[str, Any]:
    missing = [tool for tool in ("curl", "jq", "kubectl", "bash") if shutil.which(tool) is None]
    if missing:
        return {"skipped": f"missing tools: {', '.join(missing)}"}
    stack = Stack(opts, "baseline", lifetime=3600.0)
    meter = Meter.now()
    loops = max(1, opts.baseline_loops)
    rounds = max(1, opts.baseline_refreshes // loops)
    result: dict[str, Any] = {"loops": loops, "rounds": rounds}
    try:
        await stack.start()
        script = stack.dir / "refresh-loop.sh"
        script.write_text(BASELINE_SCRIPT)
        env = {
            "CLIENT_SECRET": stack.client_secret,
            "TOKEN_URL": f"{stack.idp_url}/token",
            "NAMESPACE": stack.namespace,
            "KUBECONFIG_FILE": str(stack.kubeconfig),
            "CACHE_DIR": str(stack.dir / "kube-cache"),
        }
        # One warm-up call fills kubectl's discovery cache, as on a long-lived machine (favours the baseline).
        warm = stack.children.start("baseline-warmup", ["bash", str(script), "warmup-cred", "1"], env=env)
        await asyncio.to_thread(warm.proc.wait, 120)
        await stack.idp_reset()
        before = await stack.api_counts()
        usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        procs = [
            stack.children.start(f"baseline-loop-{i}", ["bash", str(script), f"cred-{i:05d}", str(rounds)], env=env)
            for i in range(loops)
        ]
        codes = [await asyncio.to_thread(p.proc.wait, 600) for p in procs]
        wall = time.monotonic() - started
        usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        for p in procs:
            stack.children.stop(p)
        refreshes = loops * rounds
        cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
        idp = await stack.idp_stats()
        api = counts_delta(await stack.api_counts(), before)
        result.update(
            {
                "exit_codes": codes,
                "refreshes": refreshes,
                "wall_s": round(wall, 2),
                "cpu_s": round(cpu, 3),
                "cpu_ms_per_refresh": round(1000 * cpu / refreshes, 2),
                "user_ms_per_refresh": round(1000 * (usage1.ru_utime - usage0.ru_utime) / refreshes, 2),
                "sys_ms_per_refresh": round(1000 * (usage1.ru_stime - usage0.ru_stime) / refreshes, 2),
                "token_requests": idp["requests"],
                "api_requests": api,
                "api_per_refresh": per(api, refreshes),
                "kubectl": (await _kubectl_version()),
            }
        )
        result["noise"] = noise(meter, Meter.now(), stack.alive_cpu())
    finally:
        await stack.close()
    return result


async def _kubectl_version() -> str:
    proc = await asyncio.create_subprocess_exec(
        "kubectl", "version", "--client", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await proc.communicate()
    return out.decode(errors="replace").splitlines()[0].strip() if out else "?"


# -- report ------------------------------------------------------------------------------------------


def _kib(value: float | None) -> str:
    return "-" if value is None else f"{value / KIB:,.0f} KiB"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / KIB / KIB:,.1f} MiB"


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    text = (f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}") if isinstance(value, float) else str(value)
    return f"{text}{unit}"


def _top(counts: dict[str, float], limit: int = 6) -> str:
    items = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    return ", ".join(f"{k} {v:g}" for k, v in items) or "-"


def render(results: dict[str, Any]) -> str:
    lines: list[str] = []
    bursts: list[dict[str, Any]] = results.get("bursts") or []
    steady: list[dict[str, Any]] = results.get("steady") or []
    baseline: dict[str, Any] | None = results.get("baseline")
    if bursts and "s1" in bursts[0]:
        lines += ["### S1 burst (tokens valid 1 h)", ""]
        lines += [
            "| N | create | all tokens | per CR: token req | per CR: API writes | operator CPU/CR | emulator CPU "
            "| writes by verb per CR |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for b in bursts:
            s1 = b["s1"]
            wr = {k: v for k, v in s1["api_per_cr"].items() if k.split(" ")[0] in WRITE_VERBS}
            lines.append(
                f"| {b['n']} | {s1['create_s']} s ({s1['create_per_s']}/s) | {s1['all_tokens_s']} s "
                f"| {s1['token_requests_per_cr']:.2f} | {s1['api_writes_per_cr']:.2f} "
                f"| {s1['operator_cpu_ms_per_cr']} ms | {_fmt(s1['emulator_cpu_s'], ' s')} | {_top(wr)} |"
            )
        lines.append("")
    if any("s3" in b for b in bursts):
        lines += ["### S3 restart with N valid stored credentials", ""]
        lines += [
            "| N | ready after spawn | ready after controller start | token requests | Secret writes | all writes "
            "| API requests by verb |"
        ]
        lines += ["|---|---|---|---|---|---|---|"]
        for b in bursts:
            if "s3" not in b:
                continue
            s3 = b["s3"]
            lines.append(
                f"| {b['n']} | {s3['ready_s_from_spawn']} s | {s3['ready_s_from_controller']} s "
                f"| {s3['token_requests']} "
                f"| {s3['secret_writes']} | {s3['all_writes']} | {_top(s3['api_requests'], 8)} |"
            )
        lines.append("")
    if steady:
        lines += ["### S2 steady refresh", ""]
        lines += [
            "| store | N | window | refreshes/s | token req/refresh | API writes/refresh | CPU/refresh "
            "| lateness p50 / p99 / max | expired-token s | operator warnings | requests per refresh |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in steady:
            lines.append(
                f"| {s['backend']} | {s['n']} ({s['lifetime_s']:.0f} s tokens) | {s['window_s']:.0f} s "
                f"| {_fmt(s['refreshes_per_s'])} | {_fmt(s['token_requests_per_refresh'])} "
                f"| {_fmt(s['api_writes_per_refresh'])} | {_fmt(s['operator_cpu_ms_per_refresh'], ' ms')} "
                f"({_fmt(s.get('operator_user_ms_per_refresh'))} user "
                f"+ {_fmt(s.get('operator_sys_ms_per_refresh'))} sys) "
                f"| {_fmt(s['lateness_p50_s'], ' s')} / {_fmt(s['lateness_p99_s'], ' s')} "
                f"/ {_fmt(s['lateness_max_s'], ' s')} "
                f"| {s['expired_token_seconds']} | {s.get('operator_warnings', '-')} "
                f"| {_top(s['api_per_refresh'], 6)} |"
            )
        lines.append("")
    if bursts:
        lines += ["### S4 memory (operator VmRSS)", ""]
        lines += [
            "| N | empty operator | after burst | after restart | per credential (burst) | per credential (restart) |"
        ]
        lines += ["|---|---|---|---|---|---|"]
        for b in bursts:
            n = b["n"]
            per_burst = (b["rss_burst"] - b["rss_empty"]) / n if "rss_burst" in b else None
            per_restart = (b["rss_restart"] - b["rss_empty"]) / n if "rss_restart" in b else None
            lines.append(
                f"| {n} | {_mib(b['rss_empty'])} | {_mib(b.get('rss_burst'))} | {_mib(b.get('rss_restart'))} "
                f"| {_kib(per_burst)} | {_kib(per_restart)} |"
            )
        marginal = marginal_rss(bursts)
        if marginal is not None:
            low, high, burst_slope, restart_slope = marginal
            lines.append(f"| marginal {low}→{high} | | | | {_kib(burst_slope)} | {_kib(restart_slope)} |")
        lines.append("")
    if steady:
        lines += ["### S4 RSS over the steady run (after two token lifetimes of warm-up)", ""]
        lines += ["| store | N | window | RSS start → end (max) | slope | median of last third minus first third |"]
        lines += ["|---|---|---|---|---|---|"]
        for s in steady:
            lines.append(
                f"| {s['backend']} | {s['n']} | {s['window_s']:.0f} s "
                f"| {_mib(s['rss_start'])} → {_mib(s['rss_end'])} ({_mib(s['rss_max'])}) "
                f"| {_fmt(s['rss_slope_kib_per_min'])} KiB/min | {_fmt(s['rss_growth_first_to_last_third_kib'])} KiB |"
            )
        lines.append("")
    ratio = baseline_ratio(results)
    if baseline and "cpu_ms_per_refresh" in baseline:
        lines += ["### Baseline: a loop of curl | jq + kubectl apply per credential", ""]
        ref = reference_steady(results)
        lines += ["| refreshes | CPU/refresh (user+sys) | tokensync CPU/refresh | ratio | API requests per refresh |"]
        lines += ["|---|---|---|---|---|"]
        lines.append(
            f"| {baseline['refreshes']} ({baseline['loops']} loops) | {baseline['cpu_ms_per_refresh']} ms "
            f"| {_fmt(ref['operator_cpu_ms_per_refresh'] if ref else None, ' ms')} "
            f"| {_fmt(ratio, 'x')} | {_top(baseline['api_per_refresh'], 6)} |"
        )
        lines.append("")
    lines += ["### Targets", "", "| target | measured | result |", "|---|---|---|"]
    for target, measured, ok in targets(results):
        lines.append(f"| {target} | {measured} | {'PASS' if ok else 'MISS' if ok is not None else 'n/a'} |")
    lines.append("")
    lines += ["### Machine noise (CPU used by processes outside this run; 2.00 = both cores)", ""]
    lines += [
        "| phase | wall | whole machine busy | this run | others | load avg start → end |",
        "|---|---|---|---|---|---|",
    ]
    phases = [(f"burst N={b['n']}", b.get("noise")) for b in bursts]
    phases += [(f"steady {s['backend']}", s.get("noise")) for s in steady]
    phases += [("baseline", baseline.get("noise") if baseline else None)]
    for label, nz in phases:
        if nz:
            lines.append(
                f"| {label} | {nz['wall_s']} s | {nz['machine_busy_cores']} | {nz['bench_cores']} "
                f"| {nz['other_cores']} "
                f"| {nz['load_start'][0]} → {nz['load_end'][0]} |"
            )
    return "\n".join(lines) + "\n"


def marginal_rss(bursts: list[dict[str, Any]]) -> tuple[int, int, float, float | None] | None:
    """Bytes per credential between the smallest and the largest N: fixed costs cancel out."""
    sized = sorted((b for b in bursts if "rss_burst" in b), key=lambda b: b["n"])
    if len(sized) < 2:
        return None
    low, high = sized[0], sized[-1]
    span = high["n"] - low["n"]
    burst = (high["rss_burst"] - low["rss_burst"]) / span
    restart = (
        (high["rss_restart"] - low["rss_restart"]) / span if "rss_restart" in high and "rss_restart" in low else None
    )
    return low["n"], high["n"], burst, restart


def reference_steady(results: dict[str, Any]) -> dict[str, Any] | None:
    steady: list[dict[str, Any]] = results.get("steady") or []
    return next((s for s in steady if s["backend"] == "secret"), steady[0] if steady else None)


def baseline_ratio(results: dict[str, Any]) -> float | None:
    baseline: dict[str, Any] = results.get("baseline") or {}
    ref = reference_steady(results)
    if not baseline.get("cpu_ms_per_refresh") or not ref or not ref.get("operator_cpu_ms_per_refresh"):
        return None
    return float(baseline["cpu_ms_per_refresh"]) / float(ref["operator_cpu_ms_per_refresh"])


def targets(results: dict[str, Any]) -> Iterable[tuple[str, str, bool | None]]:
    bursts: list[dict[str, Any]] = results.get("bursts") or []
    steady: list[dict[str, Any]] = results.get("steady") or []
    for b in bursts:
        if "rss_burst" in b:
            per_cred = (b["rss_burst"] - b["rss_empty"]) / b["n"]
            yield f"≤ 20 KiB RSS per credential (N={b['n']}, after burst)", _kib(per_cred), per_cred <= 20 * KIB
    marginal = marginal_rss(bursts)
    if marginal is not None:
        low, high, slope, _ = marginal
        yield f"≤ 20 KiB RSS per credential (marginal, N={low}→{high}, after burst)", _kib(slope), slope <= 20 * KIB
    for s in steady:
        if not s.get("soak"):
            continue  # a plain S2 window is too short to judge growth; the S4 soak run is judged
        growth = s.get("rss_growth_first_to_last_third_kib")
        yield (
            f"no RSS growth in the steady run ({s['backend']}, {s['window_s']:.0f} s: median RSS of the last "
            "third ≤ first third + 512 KiB)",
            f"{_fmt(growth)} KiB (slope {_fmt(s.get('rss_slope_kib_per_min'))} KiB/min)",
            growth is not None and growth <= 512.0,
        )
    for s in steady:
        cpu = s.get("operator_cpu_ms_per_refresh")
        yield f"≤ 2 ms operator CPU per refresh ({s['backend']})", _fmt(cpu, " ms"), cpu is not None and cpu <= 2.0
    for s in steady:
        tr = s.get("token_requests_per_refresh")
        yield f"1.00 token request per refresh ({s['backend']})", _fmt(tr), tr is not None and abs(tr - 1.0) < 0.005
    for b in bursts:
        if "s1" in b:
            tr = b["s1"]["token_requests_per_cr"]
            yield f"1.00 token request per new credential (S1, N={b['n']})", f"{tr:.3f}", abs(tr - 1.0) < 0.005
    for s in steady:
        wr = s.get("api_writes_per_refresh")
        yield f"≤ 2 API writes per refresh ({s['backend']})", _fmt(wr), wr is not None and wr <= 2.0
    for s in steady:
        yield (
            f"0 s of expired tokens in target Secrets ({s['backend']})",
            f"{s['expired_token_seconds']} s in {s['expired_secrets']} Secrets",
            s["expired_token_seconds"] == 0,
        )
    for b in bursts:
        if "s3" in b:
            s3 = b["s3"]
            yield (
                f"restart with N={b['n']} valid: 0 token requests, 0 Secret writes",
                f"{s3['token_requests']} requests, {s3['secret_writes']} writes",
                s3["token_requests"] == 0 and s3["secret_writes"] == 0,
            )
    ratio = baseline_ratio(results)
    if ratio is not None:
        yield "≥ 20x less CPU per refresh than the baseline", f"{ratio:.1f}x", ratio >= 20.0


# -- main --------------------------------------------------------------------------------------------


def git_revision() -> str:
    """The commit under test, with ``+dirty`` when operator/ has uncommitted changes."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "operator"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


async def run(opts: Options) -> dict[str, Any]:
    results: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "target": str(opts.kubeconfig) if opts.kubeconfig else "emulator",
        "revision": git_revision(),
        "operator_env": opts.operator_env,
        "operator_preload": str(opts.operator_preload) if opts.operator_preload else None,
        "bursts": [],
        "steady": [],
    }
    meter = Meter.now()
    steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = []
    if {"S1", "S3", "S4"} & set(opts.scenarios):
        for n in opts.sizes:
            steps.append((f"burst N={n}", lambda n=n: burst_phase(opts, n)))  # type: ignore[misc]
    if {"S2", "S4"} & set(opts.scenarios):
        backends = opts.backends if "S2" in opts.scenarios else ["secret"]
        for backend in backends:
            duration = opts.steady_seconds if "S2" in opts.scenarios else 0.0
            soak = "S4" in opts.scenarios and backend == backends[0]
            if soak:
                duration = max(duration, opts.soak_seconds)
            steps.append(
                (f"steady {backend}", lambda b=backend, d=duration, k=soak: steady_phase(opts, b, d, soak=k))  # type: ignore[misc]
            )
    if "baseline" in opts.scenarios:
        steps.append(("baseline", lambda: baseline_phase(opts)))
    for label, step in steps:
        log(f"{label}: starting")
        value = await step()
        if label.startswith("burst"):
            results["bursts"].append(value)
        elif label.startswith("steady"):
            results["steady"].append(value)
        else:
            results["baseline"] = value
        log(f"{label}: done")
    results["noise"] = {"whole_run": noise(meter, Meter.now(), 0.0)}
    return results


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--render"] and len(args) == 2:  # print the tables of an earlier run's JSON again
        results = json.loads(Path(args[1]).read_text())
        print(render(results))
        return 0
    opts = parse_args(argv)
    opts.results.mkdir(parents=True, exist_ok=True)
    log(f"results and logs in {opts.results.relative_to(ROOT) if opts.results.is_relative_to(ROOT) else opts.results}")
    try:
        results = asyncio.run(run(opts))
    except KeyboardInterrupt:
        log("interrupted; every process this run started has been stopped")
        return 130
    results["baseline_ratio"] = baseline_ratio(results)
    table = render(results)
    results["table"] = table
    print(table)
    (opts.results / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (opts.results / "results.md").write_text(table)
    if opts.json_path is not None:
        opts.json_path.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
