"""
The CredentialStore contract, asserted once and run against every backend.

Backend-specific promises (file modes, Redis TTLs, keyring degradation) live in
their own test files; this one is what a new backend must pass first.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
import redis.asyncio
from pydantic import SecretStr

from tokensync.models import TokenSet, utcnow
from tokensync.stores import (
    AsyncCredentialStore,
    AsyncMemoryStore,
    AsyncRedisStore,
    CredentialStore,
    FileStore,
    MemoryStore,
    RedisStore,
)

KEY = "tokensync:test:contract"


def make_tokens(tag: str, *, refresh: bool = True, id_token: bool = True) -> TokenSet:
    issued = utcnow().replace(microsecond=0)
    return TokenSet(
        access_token=SecretStr(f"test-secret-access-{tag}"),
        refresh_token=SecretStr(f"test-secret-refresh-{tag}") if refresh else None,
        id_token=SecretStr(f"test-secret-id-{tag}") if id_token else None,
        scope="openid profile",
        issued_at=issued,
        expires_at=issued + timedelta(hours=1),
        refresh_expires_at=issued + timedelta(days=1) if refresh else None,
    )


def secrets_of(tokens: TokenSet) -> list[str]:
    values = [tokens.access_token, tokens.refresh_token, tokens.id_token]
    return [value.get_secret_value() for value in values if value is not None]


# Payloads that no TokenSet decoder accepts. The last one is the nasty case: pydantic's
# error text quotes the offending input, so a store that logs str(exc) leaks the secret.
DAMAGED = {
    "not-json": b'{"access_token": "test-secret-damaged-truncated',
    "not-utf8": b"\xff\xfe test-secret-damaged-binary",
    "wrong-shape": b'{"access_token": ["test-secret-damaged-quoted"], "issued_at": "2024-01-01T00:00:00Z"}',
}


# -- fixtures: every backend behind one name -------------------------------------------------


@pytest.fixture(params=["memory", "file", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CredentialStore[TokenSet]]:
    if request.param == "memory":
        yield MemoryStore[TokenSet]()
    elif request.param == "file":
        yield FileStore.for_tokens(tmp_path / "tokens.json")
    else:
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        yield RedisStore.for_tokens(client, KEY)
        client.close()


@pytest.fixture(params=["file", "redis"])
def damageable(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[CredentialStore[TokenSet], Callable[[bytes], None], Callable[[], bytes | None]]]:
    """A serialising store, a way to plant raw bytes in its backend, and to read them back."""
    if request.param == "file":
        path = tmp_path / "tokens.json"
        yield (
            FileStore.for_tokens(path),
            path.write_bytes,
            lambda: path.read_bytes() if path.exists() else None,
        )
    else:
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        yield RedisStore.for_tokens(client, KEY), lambda raw: client.set(KEY, raw), lambda: client.get(KEY)
        client.close()


@pytest.fixture(params=["async-memory", "async-redis"])
async def async_store(request: pytest.FixtureRequest) -> AsyncIterator[AsyncCredentialStore[TokenSet]]:
    if request.param == "async-memory":
        yield AsyncMemoryStore[TokenSet]()
    else:
        client = redis.asyncio.Redis.from_url(request.getfixturevalue("redis_url"))
        yield AsyncRedisStore.for_tokens(client, KEY)
        await client.aclose()


# -- the sync contract -------------------------------------------------------------------------


def test_empty_store_loads_none(store: CredentialStore[TokenSet]) -> None:
    assert store.load() is None


def test_round_trip(store: CredentialStore[TokenSet]) -> None:
    tokens = make_tokens("roundtrip")
    store.save(tokens)
    loaded = store.load()
    assert loaded == tokens
    assert loaded is not None
    assert loaded.refresh_token is not None
    assert loaded.refresh_token.get_secret_value() == "test-secret-refresh-roundtrip"


def test_save_replaces_entirely(store: CredentialStore[TokenSet]) -> None:
    store.save(make_tokens("first"))
    second = make_tokens("second", refresh=False, id_token=False)
    store.save(second)
    loaded = store.load()
    assert loaded == second
    assert loaded is not None
    assert loaded.refresh_token is None  # nothing of the first value survives
    assert loaded.id_token is None


def test_clear_is_idempotent(store: CredentialStore[TokenSet]) -> None:
    store.clear()  # clearing an empty store is not an error
    store.save(make_tokens("clear"))
    store.clear()
    assert store.load() is None
    store.clear()
    assert store.load() is None


def test_save_after_clear(store: CredentialStore[TokenSet]) -> None:
    store.save(make_tokens("before"))
    store.clear()
    after = make_tokens("after")
    store.save(after)
    assert store.load() == after


def test_repr_never_shows_the_value(store: CredentialStore[TokenSet]) -> None:
    tokens = make_tokens("repr")
    store.save(tokens)
    text = repr(store) + str(store)
    assert all(secret not in text for secret in secrets_of(tokens))
    assert "test-secret" not in text


def test_close_is_harmless(store: CredentialStore[TokenSet]) -> None:
    store.close()


# -- damaged payloads ----------------------------------------------------------------------------


@pytest.mark.parametrize("raw", DAMAGED.values(), ids=DAMAGED.keys())
def test_damaged_payload_loads_none_and_logs_without_payload(
    damageable: tuple[CredentialStore[TokenSet], Callable[[bytes], None], Callable[[], bytes | None]],
    raw: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, plant, read_raw = damageable
    plant(raw)
    caplog.set_level(logging.DEBUG, logger="tokensync")

    assert store.load() is None

    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].name.startswith("tokensync.stores.")
    assert warnings[0].exc_info is None  # a traceback would carry the decoder's message
    assert "test-secret" not in caplog.text
    assert raw.decode("utf-8", "replace") not in caplog.text
    # load() never mutates: the damaged entry stays for a human to look at.
    assert read_raw() == raw


def test_the_leaky_payload_really_is_leaky() -> None:
    # Guards the test above: if pydantic stopped quoting inputs, it would prove nothing.
    with pytest.raises(ValueError, match="test-secret-damaged-quoted"):
        TokenSet.from_json(DAMAGED["wrong-shape"])


def test_damaged_payload_is_replaced_by_save(
    damageable: tuple[CredentialStore[TokenSet], Callable[[bytes], None], Callable[[], bytes | None]],
) -> None:
    store, plant, _ = damageable
    plant(DAMAGED["not-json"])
    tokens = make_tokens("repaired")
    store.save(tokens)
    assert store.load() == tokens


# -- the async contract -------------------------------------------------------------------------


async def test_async_empty_store_loads_none(async_store: AsyncCredentialStore[TokenSet]) -> None:
    assert await async_store.load() is None


async def test_async_round_trip(async_store: AsyncCredentialStore[TokenSet]) -> None:
    tokens = make_tokens("async-roundtrip")
    await async_store.save(tokens)
    assert await async_store.load() == tokens


async def test_async_save_replaces_entirely(async_store: AsyncCredentialStore[TokenSet]) -> None:
    await async_store.save(make_tokens("async-first"))
    second = make_tokens("async-second", refresh=False, id_token=False)
    await async_store.save(second)
    loaded = await async_store.load()
    assert loaded == second
    assert loaded is not None
    assert loaded.refresh_token is None


async def test_async_clear_is_idempotent(async_store: AsyncCredentialStore[TokenSet]) -> None:
    await async_store.clear()
    await async_store.save(make_tokens("async-clear"))
    await async_store.clear()
    await async_store.clear()
    assert await async_store.load() is None


async def test_async_repr_never_shows_the_value(async_store: AsyncCredentialStore[TokenSet]) -> None:
    await async_store.save(make_tokens("async-repr"))
    assert "test-secret" not in repr(async_store)
    await async_store.close()


@pytest.mark.parametrize("raw", DAMAGED.values(), ids=DAMAGED.keys())
async def test_async_damaged_payload_loads_none_and_logs_without_payload(
    redis_url: str, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.set(KEY, raw)
        store = AsyncRedisStore.for_tokens(client, KEY)
        caplog.set_level(logging.DEBUG, logger="tokensync")
        assert await store.load() is None
        assert [r.levelno for r in caplog.records if r.name.startswith("tokensync")] == [logging.WARNING]
        assert "test-secret" not in caplog.text
        assert await client.get(KEY) == raw
    finally:
        await client.aclose()


# -- the base classes ---------------------------------------------------------------------------


def test_incomplete_backends_cannot_be_instantiated() -> None:
    class Forgetful(CredentialStore[str]):
        def load(self) -> str | None:
            return None

        def save(self, value: str) -> None:
            pass

    with pytest.raises(TypeError, match="clear"):
        Forgetful()  # type: ignore[abstract]


def test_generic_values_need_no_tokens(tmp_path: Path) -> None:
    # Stores are generic: any value with a codec, not only token sets.
    def decode(raw: str | bytes) -> str:
        return raw.decode() if isinstance(raw, bytes) else raw

    store = FileStore[str](tmp_path / "plain.txt", serialize=str, deserialize=decode)
    store.save("test-secret-plain-string")
    assert store.load() == "test-secret-plain-string"
