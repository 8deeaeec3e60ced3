"""
Stores in one Redis key: what several operator replicas, or several services
behind one client id, share so that only one of them has to refresh.

The value is one string key written with a single ``SET``, which Redis applies
atomically; a plain ``SET`` also drops any TTL of the previous value, so "save
replaces" holds for the expiry too.

The TTL is the caller's business, because stores do not interpret tokens: a
fixed number of seconds, or a function of the value (e.g. the refresh token's
remaining lifetime, after which the entry is useless anyway). Non-positive,
infinite or ``None`` lifetimes mean "no expiry": dropping a value the moment it
is written would be a surprising way to say "unknown". Redis's ``EX`` takes
whole seconds; fractions are rounded *up*, so that a short positive lifetime
never becomes an immediate expiry.

With ``compare_and_swap=True``, a save replaces the value only if it is still
what this store last read or wrote (a Lua script compares and sets in one step,
which Redis runs atomically); otherwise :class:`~tokensync.stores.base.StoreConflictError`.
That is what several processes sharing rotating refresh tokens need: the loser of
a race reads the winner's token set instead of overwriting it. It is off by
default because a store that is only ever written by one process gains nothing.

:class:`AsyncRedisLease` is the cross-process lock that goes with it: an owner
token and an expiry in one key, taken and released by Lua scripts on Redis's own
clock (no clock skew between the processes sharing it). Not redis-py's ``Lock``:
its key vanishes when it expires, and with it the record of what a crashed
holder was guarding, which is what tells a restarted operator that a refresh
token may have been spent. Here the expiry is a field of the value; the key
itself lives a day longer, only so that abandoned records are collected.

Redis failures of any kind (refused connections, timeouts, authentication,
wrong key types) are :class:`~tokensync.stores.base.StoreError`: the caller must
be able to tell "nothing stored" from "the store is down". The clients belong to
the caller, with their pools and retry policies, and are not closed here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from typing import TypeVar

import redis
import redis.asyncio
from redis.exceptions import RedisError

from tokensync.models import TokenSet
from tokensync.stores.base import (
    AsyncCredentialStore,
    AsyncLease,
    CredentialStore,
    Deserializer,
    LeaseGrant,
    Serializer,
    StoreConflictError,
    StoreError,
    decode_or_none,
)

__all__ = ["TTL", "AsyncRedisLease", "AsyncRedisStore", "RedisStore"]

# KEYS[1]: the key. ARGV: expect-absent flag, expected payload, new payload, EX seconds ("" for none).
_COMPARE_AND_SET = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if current then return 0 end
elseif current ~= ARGV[2] then
  return 0
end
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4])
else
  redis.call('SET', KEYS[1], ARGV[3])
end
return 1
"""

_UNSEEN = object()

# KEYS[1]: the lease key. ARGV: owner, ttl seconds, guarding, key lifetime in ms.
# Returns {acquired (0/1), the previous record or ""}.
_LEASE_ACQUIRE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local previous = redis.call('GET', KEYS[1])
if previous then
  local ok, record = pcall(cjson.decode, previous)
  if ok and type(record) == 'table' and record['owner'] ~= ARGV[1] and tonumber(record['until'] or 0) > now then
    return {0, previous}
  end
end
local value = cjson.encode({owner = ARGV[1], ['until'] = now + tonumber(ARGV[2]), guarding = ARGV[3]})
redis.call('SET', KEYS[1], value, 'PX', ARGV[4])
return {1, previous or ''}
"""

# KEYS[1]: the lease key. ARGV[1]: owner. Deletes the record only if owner holds it.
_LEASE_RELEASE = """
local previous = redis.call('GET', KEYS[1])
if not previous then return 0 end
local ok, record = pcall(cjson.decode, previous)
if ok and type(record) == 'table' and record['owner'] == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_LEASE_RECORD_LIFETIME = 86_400.0


def _cas_args(seen: object, payload: str | bytes, expiry: int | None) -> list[str | bytes]:
    absent = seen is None or seen is _UNSEEN
    expected: str | bytes = b"" if absent else seen  # type: ignore[assignment]
    return ["1" if absent else "0", expected, payload, "" if expiry is None else str(expiry)]


T = TypeVar("T")

TTL = float | Callable[[T], float | None] | None

logger = logging.getLogger(__name__)


class RedisStore(CredentialStore[T]):
    """One value in one Redis key, over a synchronous ``redis.Redis`` client."""

    def __init__(
        self,
        redis_client: redis.Redis,
        key: str,
        serialize: Serializer[T],
        deserialize: Deserializer[T],
        ttl_seconds: TTL[T] = None,
        *,
        compare_and_swap: bool = False,
    ) -> None:
        self._client = redis_client
        self._key = key
        self._serialize = serialize
        self._deserialize = deserialize
        self._ttl = ttl_seconds
        self._cas = redis_client.register_script(_COMPARE_AND_SET) if compare_and_swap else None
        self._seen: object = _UNSEEN

    @classmethod
    def for_tokens(cls, redis_client: redis.Redis, key: str, ttl_seconds: TTL[TokenSet] = None) -> RedisStore[TokenSet]:
        """A store of token sets in their JSON codec, the usual case."""
        return RedisStore[TokenSet](redis_client, key, TokenSet.to_json, TokenSet.from_json, ttl_seconds)

    @property
    def key(self) -> str:
        return self._key

    def __repr__(self) -> str:
        # Not the client: its repr is the caller's to show, and may name more than we should.
        return f"{type(self).__name__}(key={self._key!r}, ttl_seconds={_describe(self._ttl)})"

    def load(self) -> T | None:
        with _failing(self._key, "read"):
            payload = self._client.get(self._key)
        self._seen = payload
        if payload is None:
            return None
        return decode_or_none(self._deserialize, payload, logger=logger, where=repr(self))

    def save(self, value: T) -> None:
        payload = self._serialize(value)
        expiry = _expiry(self._ttl, value)
        if self._cas is None:
            with _failing(self._key, "write"):
                self._client.set(self._key, payload, ex=expiry)
            return
        with _failing(self._key, "write"):
            swapped = self._cas(keys=[self._key], args=_cas_args(self._seen, payload, expiry))
        if not swapped:
            self._seen = _UNSEEN
            raise StoreConflictError(f"Redis key {self._key!r} changed since it was read; reload first")
        self._seen = payload

    def clear(self) -> None:
        with _failing(self._key, "delete"):
            self._client.delete(self._key)
        self._seen = None


class AsyncRedisStore(AsyncCredentialStore[T]):
    """The asyncio twin of :class:`RedisStore`, over ``redis.asyncio.Redis``."""

    def __init__(
        self,
        redis_client: redis.asyncio.Redis,
        key: str,
        serialize: Serializer[T],
        deserialize: Deserializer[T],
        ttl_seconds: TTL[T] = None,
        *,
        compare_and_swap: bool = False,
    ) -> None:
        self._client = redis_client
        self._key = key
        self._serialize = serialize
        self._deserialize = deserialize
        self._ttl = ttl_seconds
        self._cas = redis_client.register_script(_COMPARE_AND_SET) if compare_and_swap else None
        self._seen: object = _UNSEEN

    @classmethod
    def for_tokens(
        cls, redis_client: redis.asyncio.Redis, key: str, ttl_seconds: TTL[TokenSet] = None
    ) -> AsyncRedisStore[TokenSet]:
        """A store of token sets in their JSON codec, the usual case."""
        return AsyncRedisStore[TokenSet](redis_client, key, TokenSet.to_json, TokenSet.from_json, ttl_seconds)

    @property
    def key(self) -> str:
        return self._key

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self._key!r}, ttl_seconds={_describe(self._ttl)})"

    async def load(self) -> T | None:
        with _failing(self._key, "read"):
            payload = await self._client.get(self._key)
        self._seen = payload
        if payload is None:
            return None
        return decode_or_none(self._deserialize, payload, logger=logger, where=repr(self))

    async def save(self, value: T) -> None:
        payload = self._serialize(value)
        expiry = _expiry(self._ttl, value)
        if self._cas is None:
            with _failing(self._key, "write"):
                await self._client.set(self._key, payload, ex=expiry)
            return
        with _failing(self._key, "write"):
            swapped = await self._cas(keys=[self._key], args=_cas_args(self._seen, payload, expiry))
        if not swapped:
            self._seen = _UNSEEN
            raise StoreConflictError(f"Redis key {self._key!r} changed since it was read; reload first")
        self._seen = payload

    async def clear(self) -> None:
        with _failing(self._key, "delete"):
            await self._client.delete(self._key)
        self._seen = None


class AsyncRedisLease(AsyncLease):
    """A lease in one Redis key, next to the store it protects (``<key>:lease`` by convention)."""

    def __init__(self, redis_client: redis.asyncio.Redis, key: str) -> None:
        self._client = redis_client
        self._key = key
        self._acquire = redis_client.register_script(_LEASE_ACQUIRE)
        self._release = redis_client.register_script(_LEASE_RELEASE)

    @property
    def key(self) -> str:
        return self._key

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self._key!r})"

    async def acquire(self, *, owner: str, ttl: float, guarding: str = "") -> LeaseGrant:
        keep_ms = str(math.ceil((ttl + _LEASE_RECORD_LIFETIME) * 1000))
        with _failing(self._key, "acquire the lease"):
            acquired, previous = await self._acquire(keys=[self._key], args=[owner, str(ttl), guarding, keep_ms])
        if not acquired:
            return LeaseGrant(acquired=False)
        return LeaseGrant(acquired=True, interrupted=bool(guarding) and _guarded(previous) == guarding)

    async def release(self, *, owner: str) -> None:
        with _failing(self._key, "release the lease"):
            await self._release(keys=[self._key], args=[owner])


def _guarded(record: str | bytes | None) -> str:
    if not record:
        return ""
    try:
        value = json.loads(record)
        return str(value.get("guarding") or "") if isinstance(value, dict) else ""
    except ValueError:
        return ""


@contextlib.contextmanager
def _failing(key: str, action: str) -> Iterator[None]:
    # The exception's type is enough for the message; its text stays in the chained cause,
    # which names hosts and ports but never values (Redis does not echo them back).
    try:
        yield
    except RedisError as exc:
        raise StoreError(f"Redis failed to {action} the credential key {key!r}: {type(exc).__name__}") from exc


def _expiry(ttl: TTL[T], value: T) -> int | None:
    seconds = ttl(value) if callable(ttl) else ttl
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return None
    return math.ceil(seconds)


def _describe(ttl: TTL[T]) -> str:
    if callable(ttl):
        return f"<{getattr(ttl, '__qualname__', type(ttl).__name__)}>"
    return repr(ttl)
