"""Suite-wide fixtures. Each block says what it provides; add yours as its own block."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

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
