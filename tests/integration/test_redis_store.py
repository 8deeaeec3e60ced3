"""RedisStore against a real redis-server: TTLs as Redis reports them, and outages."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import pytest
import redis
import redis.asyncio
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from support.redis_server import RedisServer
from tokensync.models import TokenSet, utcnow
from tokensync.stores import AsyncRedisStore, RedisStore, StoreError

KEY = "tokensync:test:redis"
NO_EXPIRY = -1  # what TTL answers for a key without an expiry


def make_tokens(tag: str, *, refresh_lifetime: timedelta | None = timedelta(hours=8)) -> TokenSet:
    issued = utcnow().replace(microsecond=0)
    return TokenSet(
        access_token=SecretStr(f"test-secret-access-{tag}"),
        refresh_token=SecretStr(f"test-secret-refresh-{tag}"),
        issued_at=issued,
        expires_at=issued + timedelta(minutes=5),
        refresh_expires_at=issued + refresh_lifetime if refresh_lifetime is not None else None,
    )


def refresh_lifetime(tokens: TokenSet) -> float | None:
    """The TTL an operator would use: the entry is useless once the refresh token expired."""
    if tokens.refresh_expires_at is None:
        return None
    return (tokens.refresh_expires_at - utcnow()).total_seconds()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    # No retries: an outage should be reported now, not after redis-py's backoff schedule.
    client = redis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=2)
    yield client
    client.close()


@pytest.fixture
async def async_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=2)
    yield client
    await client.aclose()


# -- TTL ------------------------------------------------------------------------------------------


def test_fixed_ttl_is_set_with_ex(client: redis.Redis) -> None:
    RedisStore.for_tokens(client, KEY, ttl_seconds=120).save(make_tokens("ttl"))
    assert 118 <= client.ttl(KEY) <= 120


def test_fractional_ttl_rounds_up_not_to_zero(client: redis.Redis) -> None:
    RedisStore.for_tokens(client, KEY, ttl_seconds=0.2).save(make_tokens("fraction"))
    assert 0 < client.pttl(KEY) <= 1000


def test_callable_ttl_sees_the_value(client: redis.Redis) -> None:
    store = RedisStore.for_tokens(client, KEY, ttl_seconds=refresh_lifetime)
    store.save(make_tokens("per-value", refresh_lifetime=timedelta(hours=8)))
    assert 8 * 3600 - 5 <= client.ttl(KEY) <= 8 * 3600
    store.save(make_tokens("per-value-short", refresh_lifetime=timedelta(minutes=10)))
    assert 600 - 5 <= client.ttl(KEY) <= 600


@pytest.mark.parametrize("ttl", [None, 0, -5, math.inf, math.nan], ids=repr)
def test_no_ttl(client: redis.Redis, ttl: float | None) -> None:
    RedisStore.for_tokens(client, KEY, ttl_seconds=ttl).save(make_tokens("forever"))
    assert client.ttl(KEY) == NO_EXPIRY


def test_callable_ttl_returning_none_means_no_expiry(client: redis.Redis) -> None:
    store = RedisStore.for_tokens(client, KEY, ttl_seconds=refresh_lifetime)
    store.save(make_tokens("unknown-lifetime", refresh_lifetime=None))
    assert client.ttl(KEY) == NO_EXPIRY


def test_save_without_ttl_drops_the_previous_ttl(client: redis.Redis) -> None:
    RedisStore.for_tokens(client, KEY, ttl_seconds=60).save(make_tokens("expiring"))
    RedisStore.for_tokens(client, KEY).save(make_tokens("forever"))
    assert client.ttl(KEY) == NO_EXPIRY


def test_expired_entry_loads_none(client: redis.Redis) -> None:
    store = RedisStore.for_tokens(client, KEY, ttl_seconds=1)
    store.save(make_tokens("short"))
    client.pexpire(KEY, 1)  # rather than sleeping a whole second: Redis expires it all the same
    time.sleep(0.05)
    assert store.load() is None


def test_value_is_json_not_pickle(client: redis.Redis) -> None:
    tokens = make_tokens("json")
    RedisStore.for_tokens(client, KEY).save(tokens)
    raw = client.get(KEY)
    assert isinstance(raw, bytes)
    assert raw.startswith(b"{")
    assert TokenSet.from_json(raw) == tokens


def test_decoded_responses_work_too(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        tokens = make_tokens("str-payload")
        store = RedisStore.for_tokens(client, KEY)
        store.save(tokens)
        assert store.load() == tokens
    finally:
        client.close()


def test_repr_shows_key_and_ttl_only(client: redis.Redis) -> None:
    store = RedisStore.for_tokens(client, KEY, ttl_seconds=refresh_lifetime)
    store.save(make_tokens("repr"))
    text = repr(store)
    assert KEY in text
    assert "refresh_lifetime" in text
    assert "test-secret" not in text
    assert "127.0.0.1" not in text  # the client is the caller's business


# -- outages --------------------------------------------------------------------------------------


def test_stopped_server_is_a_store_error(
    client: redis.Redis, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore.for_tokens(client, KEY, ttl_seconds=60)
    tokens = make_tokens("outage")
    store.save(tokens)
    redis_server.stop()
    try:
        for operation in (store.load, lambda: store.save(make_tokens("during-outage")), store.clear):
            with pytest.raises(StoreError) as info:
                operation()
            assert KEY in str(info.value)
            assert "test-secret" not in str(info.value)
            assert isinstance(info.value.__cause__, RedisError)
    finally:
        redis_server.start()
    # Same address, same client: the store works again once Redis is back (empty: --save '').
    assert store.load() is None
    store.save(tokens)
    assert store.load() == tokens
    assert "test-secret" not in caplog.text


async def test_async_stopped_server_is_a_store_error(
    async_client: redis.asyncio.Redis, redis_server: RedisServer
) -> None:
    store = AsyncRedisStore.for_tokens(async_client, KEY)
    await store.save(make_tokens("async-outage"))
    redis_server.stop()
    try:
        with pytest.raises(StoreError) as info:
            await store.load()
        assert "test-secret" not in str(info.value)
        with pytest.raises(StoreError):
            await store.save(make_tokens("async-during-outage"))
        with pytest.raises(StoreError):
            await store.clear()
    finally:
        redis_server.start()
    tokens = make_tokens("async-back")
    await store.save(tokens)
    assert await store.load() == tokens


def test_wrong_key_type_is_a_store_error(client: redis.Redis) -> None:
    client.hset(KEY, "field", "value")
    with pytest.raises(StoreError, match="ResponseError"):
        RedisStore.for_tokens(client, KEY).load()


# -- async ------------------------------------------------------------------------------------------


async def test_async_ttl(async_client: redis.asyncio.Redis) -> None:
    store = AsyncRedisStore.for_tokens(async_client, KEY, ttl_seconds=refresh_lifetime)
    tokens = make_tokens("async-ttl", refresh_lifetime=timedelta(minutes=30))
    await store.save(tokens)
    assert 1800 - 5 <= await async_client.ttl(KEY) <= 1800
    assert await store.load() == tokens
    await AsyncRedisStore.for_tokens(async_client, KEY, ttl_seconds=45).save(tokens)
    assert 43 <= await async_client.ttl(KEY) <= 45
    await AsyncRedisStore.for_tokens(async_client, KEY).save(tokens)
    assert await async_client.ttl(KEY) == NO_EXPIRY


async def test_async_and_sync_share_the_entry(async_client: redis.asyncio.Redis, client: redis.Redis) -> None:
    tokens = make_tokens("shared")
    await AsyncRedisStore.for_tokens(async_client, KEY).save(tokens)
    assert RedisStore.for_tokens(client, KEY).load() == tokens
    RedisStore.for_tokens(client, KEY).clear()
    assert await AsyncRedisStore.for_tokens(async_client, KEY).load() is None


async def test_async_damaged_entry_warns_once(
    async_client: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await async_client.set(KEY, b'{"access_token": "test-secret-async-damaged"')
    caplog.set_level(logging.WARNING, logger="tokensync")
    assert await AsyncRedisStore.for_tokens(async_client, KEY).load() is None
    assert len([r for r in caplog.records if r.name.startswith("tokensync")]) == 1
    assert "test-secret" not in caplog.text


def test_generic_values(client: redis.Redis) -> None:
    store = RedisStore[int](client, KEY, str, lambda raw: int(raw), ttl_seconds=lambda value: value)
    store.save(30)
    assert store.load() == 30
    assert 28 <= client.ttl(KEY) <= 30
