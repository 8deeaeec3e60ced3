"""The cross-process lease and compare-and-swap that keep a rotating refresh token spent once.

Every lease backend runs the same contract (the invariants in ``stores/base.py``):
memory, real Redis, and the Kubernetes Secret store against the API emulator.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
import redis.asyncio

from tokensync.controller.kube import KubeClient
from tokensync.models import TokenSet, utcnow
from tokensync.stores import AsyncLease, AsyncMemoryLease, AsyncRedisLease, AsyncRedisStore, StoreConflictError
from tokensync.stores.kubernetes import LEASE_ANNOTATION, KubernetesSecretStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def tokens(tag: str) -> TokenSet:
    return TokenSet(
        access_token=f"test-secret-access-{tag}",
        refresh_token=f"test-secret-refresh-{tag}",
        issued_at=utcnow(),
        expires_at=utcnow() + timedelta(hours=1),
    )


def secret_store(
    client: KubeClient, clock: Callable[[], float], name: str = "lease-test"
) -> KubernetesSecretStore[Any]:
    return KubernetesSecretStore(
        client, namespace="default", name=name, serialize=TokenSet.to_json, deserialize=TokenSet.from_json, clock=clock
    )


@pytest.fixture(params=["memory", "redis", "kubernetes"])
async def leases(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[Callable[[], AsyncLease], Callable[[float], Any]]]:
    """A factory of lease handles on ONE lock (as separate processes would hold), and a way to let time pass."""
    if request.param == "memory":
        clock = Clock()
        shared = AsyncMemoryLease(clock=clock)

        async def advance_memory(seconds: float) -> None:
            clock.now += seconds

        yield (lambda: shared), advance_memory
    elif request.param == "redis":
        client = redis.asyncio.Redis.from_url(request.getfixturevalue("redis_url"))
        key = f"lease-test:{request.node.name}"
        await client.delete(key)

        async def advance_redis(seconds: float) -> None:
            await asyncio.sleep(seconds)

        yield (lambda: AsyncRedisLease(client, key)), advance_redis
        await client.delete(key)
        await client.aclose()
    else:
        cluster = request.getfixturevalue("kube")
        kube_clock = Clock()
        kube_client = KubeClient.for_url(cluster.url)

        async def advance_kube(seconds: float) -> None:
            kube_clock.now += seconds

        yield (lambda: secret_store(kube_client, kube_clock)), advance_kube
        await kube_client.close()


async def test_lease_excludes_other_owners_until_released(leases: Any) -> None:
    make, _ = leases
    first, second = make(), make()
    assert await first.acquire(owner="replica-a", ttl=30)
    assert not await second.acquire(owner="replica-b", ttl=30)
    await first.release(owner="replica-a")
    assert await second.acquire(owner="replica-b", ttl=30)


async def test_same_owner_takes_its_own_lease_back(leases: Any) -> None:
    """A restarted process with the same identity does not wait out its dead predecessor."""
    make, _ = leases
    assert await make().acquire(owner="replica-a", ttl=30)
    assert await make().acquire(owner="replica-a", ttl=30)
    assert not await make().acquire(owner="replica-b", ttl=30)


async def test_release_by_a_non_owner_is_a_no_op(leases: Any) -> None:
    make, _ = leases
    assert await make().acquire(owner="replica-a", ttl=30)
    await make().release(owner="replica-b")
    assert not await make().acquire(owner="replica-b", ttl=30)


async def test_an_expired_lease_is_free_and_its_old_holder_cannot_release_the_new_one(leases: Any) -> None:
    make, advance = leases
    assert await make().acquire(owner="crashed", ttl=0.3)
    await advance(0.5)
    assert await make().acquire(owner="replica-b", ttl=30)
    await make().release(owner="crashed")
    assert not await make().acquire(owner="replica-c", ttl=30)


# -- Kubernetes: the lease is an annotation on the state Secret ------------------------------------


async def test_secret_lease_is_released_by_the_save_that_stores_the_new_tokens(kube: Any) -> None:
    client, clock = KubeClient.for_url(kube.url), Clock()
    try:
        holder, other = secret_store(client, clock), secret_store(client, clock)
        await holder.save(tokens("one"))
        assert await holder.acquire(owner="replica-a", ttl=30)
        body = await client.read_secret("default", "lease-test")
        assert body is not None
        assert "replica-a" in body["metadata"]["annotations"][LEASE_ANNOTATION]
        leased = await holder.load()  # the lease keeps the stored value as it was
        assert leased is not None
        assert leased.access_token.get_secret_value() == "test-secret-access-one"
        await holder.save(tokens("two"))  # one write: new tokens, lease gone
        body = await client.read_secret("default", "lease-test")
        assert body is not None
        assert LEASE_ANNOTATION not in (body["metadata"].get("annotations") or {})
        assert await other.acquire(owner="replica-b", ttl=30)
    finally:
        await client.close()


async def test_secret_store_that_missed_a_lease_cannot_overwrite(kube: Any) -> None:
    """The loser read before the winner leased: its save is refused, and after a reload it sees the winner's."""
    client, clock = KubeClient.for_url(kube.url), Clock()
    try:
        winner, loser = secret_store(client, clock), secret_store(client, clock)
        await winner.save(tokens("one"))
        await loser.load()
        assert await winner.acquire(owner="replica-a", ttl=30)
        await winner.save(tokens("two"))
        with pytest.raises(StoreConflictError):
            await loser.save(tokens("loser"))
        reloaded = await loser.load()
        assert reloaded is not None
        assert reloaded.access_token.get_secret_value() == "test-secret-access-two"
    finally:
        await client.close()


# -- Redis compare-and-swap --------------------------------------------------------------------------


@pytest.fixture
async def redis_pair(redis_url: str) -> AsyncIterator[tuple[AsyncRedisStore[TokenSet], AsyncRedisStore[TokenSet]]]:
    client = redis.asyncio.Redis.from_url(redis_url)
    key = "cas-test"
    await client.delete(key)

    def make() -> AsyncRedisStore[TokenSet]:
        return AsyncRedisStore(
            client, key, TokenSet.to_json, TokenSet.from_json, ttl_seconds=600, compare_and_swap=True
        )

    yield make(), make()
    await client.delete(key)
    await client.aclose()


async def test_redis_cas_refuses_a_save_over_a_value_it_never_saw(redis_pair: Any) -> None:
    first, second = redis_pair
    assert await first.load() is None
    assert await second.load() is None
    await first.save(tokens("winner"))
    with pytest.raises(StoreConflictError):
        await second.save(tokens("loser"))
    # Refused again until it reloads: the winner's value is the truth now.
    with pytest.raises(StoreConflictError):
        await second.save(tokens("loser"))
    reloaded = await second.load()
    assert reloaded is not None
    assert reloaded.access_token.get_secret_value() == "test-secret-access-winner"
    await second.save(tokens("next"))
    again = await first.load()
    assert again is not None
    assert again.access_token.get_secret_value() == "test-secret-access-next"


async def test_redis_cas_keeps_the_ttl_and_successive_saves_work(redis_pair: Any, redis_url: str) -> None:
    store, _ = redis_pair
    await store.load()
    await store.save(tokens("a"))
    await store.save(tokens("b"))
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert 0 < await client.ttl("cas-test") <= 600
    finally:
        await client.aclose()


async def test_redis_cas_conflict_names_the_key_not_the_value(redis_pair: Any) -> None:
    first, second = redis_pair
    await first.save(tokens("winner"))
    with pytest.raises(StoreConflictError) as info:
        await second.save(tokens("loser"))
    assert "cas-test" in str(info.value)
    assert "test-secret" not in str(info.value)


async def test_a_lease_left_behind_guarding_the_same_value_reports_the_interruption(leases: Any) -> None:
    """A holder that died mid-refresh is visible to whoever comes next, itself after a restart included."""
    make, advance = leases
    assert await make().acquire(owner="replica-a", ttl=0.3, guarding="rt-1")
    again = await make().acquire(owner="replica-a", ttl=30, guarding="rt-1")  # restarted, same identity
    assert again and again.interrupted
    assert await make().acquire(owner="replica-a", ttl=0.3, guarding="rt-2")
    await advance(0.5)
    other = await make().acquire(owner="replica-b", ttl=30, guarding="rt-2")  # took over an expired lease
    assert other and other.interrupted


async def test_a_released_or_differently_guarded_lease_is_not_an_interruption(leases: Any) -> None:
    make, _ = leases
    assert await make().acquire(owner="replica-a", ttl=30, guarding="rt-1")
    await make().release(owner="replica-a")
    clean = await make().acquire(owner="replica-b", ttl=30, guarding="rt-1")
    assert clean and not clean.interrupted
    other_value = await make().acquire(owner="replica-b", ttl=30, guarding="rt-2")
    assert other_value and not other_value.interrupted
    busy = await make().acquire(owner="replica-c", ttl=30, guarding="rt-2")
    assert not busy and not busy.interrupted


async def test_secret_lease_survives_a_conflict_from_someone_who_only_touched_the_secret() -> None:
    """Another writer changed an annotation between our read and our lease write (a real 409):
    the lease is free, so it is taken, not reported as held (which would delay the renewal)."""
    from support.api_faults import FaultyCluster
    from tokensync.devkit.kube import cluster_in_thread

    with cluster_in_thread(emulator=FaultyCluster()) as faulty:
        client, clock = KubeClient.for_url(faulty.url), Clock()
        try:
            store = secret_store(client, clock)
            await store.save(tokens("one"))
            faulty.emulator.inject("conflict", match=lambda method, path: method == "PUT", limit=2)
            grant = await store.acquire(owner="replica-a", ttl=30)
            assert faulty.emulator.injected["conflict"] == 2
            assert grant.acquired and not grant.interrupted
            await store.save(tokens("two"))  # the lease holder's save lands
            other = secret_store(client, clock)
            assert await other.acquire(owner="replica-b", ttl=30)
        finally:
            await client.close()
