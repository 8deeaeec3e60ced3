"""The Redis store backend for credentials, configured by the operator, never by a CR.

Keys are ``<prefix><namespace>/<name>``; the TTL follows what the stored token set
is still good for (its refresh token's lifetime when known, else its access
token's), so that Redis forgets credentials whose resource was deleted while the
operator was not running.
"""

from __future__ import annotations

from collections.abc import Callable

from tokensync.models.credential import OAuthCredential
from tokensync.models.settings import OperatorSettings
from tokensync.models.state import StoredCredential
from tokensync.models.tokens import utcnow
from tokensync.stores.base import AsyncCredentialStore
from tokensync.stores.redis import AsyncRedisStore

__all__ = ["redis_key", "redis_store_factory", "stored_ttl"]


def redis_key(prefix: str, namespace: str, name: str) -> str:
    return f"{prefix}{namespace}/{name}"


def stored_ttl(stored: StoredCredential) -> float | None:
    token_set = stored.token_set
    now = utcnow()
    if token_set.refresh_token is not None:
        if token_set.refresh_expires_at is None:
            return None
        return max(1.0, (token_set.refresh_expires_at - now).total_seconds())
    if token_set.expires_at is None:
        return None
    return max(1.0, (token_set.expires_at - now).total_seconds())


def redis_store_factory(
    settings: OperatorSettings,
) -> Callable[[OAuthCredential], AsyncCredentialStore[StoredCredential]] | None:
    """A factory of per-credential stores sharing one connection pool, or None without Redis."""
    if settings.redis_url is None:
        return None
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(settings.redis_url.get_secret_value())
    prefix = settings.redis_key_prefix

    def factory(credential: OAuthCredential) -> AsyncCredentialStore[StoredCredential]:
        return AsyncRedisStore(
            client,
            redis_key(prefix, credential.metadata.namespace, credential.metadata.name),
            StoredCredential.to_json,
            StoredCredential.from_json,
            ttl_seconds=stored_ttl,
        )

    return factory
