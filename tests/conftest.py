"""Suite-wide fixtures. Each block says what it provides; add yours as its own block."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# tests/ is not a package: make tests/support importable as `support` however pytest is run.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from support.redis_server import ENSURE_HINT, RedisServer  # noqa: E402

# -- Redis: one real redis-server per session, a clean database per test -------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free 127.0.0.1 port; `.url`, `.port`, `.stop()`, `.start()`."""
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail(ENSURE_HINT, pytrace=False)
    server = RedisServer(executable, tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of an empty database (FLUSHDB'ed), with the server running again if a test stopped it."""
    import redis

    if not redis_server.running:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_server.url


# -- Identity provider: the real OAuth2 server (tokensync.devkit.idp) as a subprocess ------

from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from support.idp import (  # noqa: E402
    IdpKeys,
    IdpProcess,
    config_key,
    generate_keys,
    standard_config,
    start_idp_process,
)


@pytest.fixture(scope="session")
def idp_keys() -> IdpKeys:
    """The RSA and EC P-256 key pairs of `jwt-rs-client` / `jwt-es-client`."""
    return generate_keys()


@pytest.fixture(scope="session")
def idp(idp_keys: IdpKeys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdpProcess]:
    """The standard IdP (support.idp.standard_config, access tokens live 3600 s), one per session.

    Shared by every test: don't change its users or secrets permanently, or use `make_idp`.
    """
    server = start_idp_process(standard_config(idp_keys), tmp_path_factory.mktemp("idp"), keys=idp_keys)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def make_idp(idp_keys: IdpKeys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., IdpProcess]]:
    """`make_idp(access_token_lifetime=2, ...)`: a standard IdP with IdpConfig fields changed.

    One process per distinct set of changes, shared for the session; `fresh=True` forces a
    new, unshared one (stopped at session end too).
    """
    cache: dict[str, IdpProcess] = {}
    started: list[IdpProcess] = []

    def make(*, fresh: bool = False, **changes: Any) -> IdpProcess:
        key = config_key(changes)
        if not fresh and key in cache and cache[key].running:
            return cache[key]
        server = start_idp_process(standard_config(idp_keys, **changes), tmp_path_factory.mktemp("idp"), keys=idp_keys)
        started.append(server)
        if not fresh:
            cache[key] = server
        return server

    try:
        yield make
    finally:
        for server in started:
            server.stop()


# -- Kubernetes: the API emulator (tokensync.devkit.kube) over HTTP, a fresh one per test ---

if TYPE_CHECKING:
    import kubernetes.client

    from tokensync.devkit.kube import RunningCluster


@pytest.fixture
def kube() -> Iterator[RunningCluster]:
    """A fresh ClusterEmulator on 127.0.0.1, served from its own thread (sync clients are safe).

    Has the `default` namespace and the project's CRDs (crds/). `.url`, `.emulator`,
    `.kube_configuration()`, `.write_kubeconfig(path)`, `.login_kopf(registry)`, and
    `.call(coro)` to run emulator coroutines (e.g. `emulator.add_crd(...)`) from the test.
    """
    from support.kube import PROJECT_CRDS
    from tokensync.devkit.kube import cluster_in_thread, read_crds

    crds = read_crds(PROJECT_CRDS) if PROJECT_CRDS.is_dir() else []
    with cluster_in_thread(crds=crds) as cluster:
        yield cluster


@pytest.fixture
def kube_api(kube: RunningCluster) -> Iterator[kubernetes.client.ApiClient]:
    """The official client's ApiClient pointed at `kube` (use with CoreV1Api, CustomObjectsApi...)."""
    import kubernetes.client

    with kubernetes.client.ApiClient(kube.kube_configuration()) as client:
        yield client


# -- Secret leaks: every log record, in every test, is scanned for secrets (support/leaks.py) ---

from support import leaks  # noqa: E402

_LEAK_WATCH = leaks.LeakWatch()


def pytest_configure(config: pytest.Config) -> None:
    import logging

    # DEBUG, so that a secret cannot hide in a record nobody looks at by default.
    root = logging.getLogger()
    root.addHandler(_LEAK_WATCH)
    root.setLevel(logging.DEBUG)
    from support.idp import ALICE_PASSWORD, BOB_PASSWORD, BOB_TOTP_SEED, CC_SECRET, PW_SECRET

    leaks.register(CC_SECRET, PW_SECRET, ALICE_PASSWORD, BOB_PASSWORD, BOB_TOTP_SEED)


@pytest.fixture(autouse=True)
def _no_secret_leaks() -> Iterator[None]:
    """Fails the test during which any log record carried a secret (named by kind, not value)."""
    _LEAK_WATCH.take()
    yield
    problems = leaks.scan_records(_LEAK_WATCH.take())
    if problems:
        pytest.fail("secret leaked: " + "; ".join(sorted(set(problems))[:10]), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if call.excinfo is not None:
        text = f"{call.excinfo.value!s} {call.excinfo.value!r}"
        hits = leaks.find(text)
        if hits:
            report.sections.append(("secret leak", f"the failure's exception text contains {', '.join(hits)}"))
    return report
