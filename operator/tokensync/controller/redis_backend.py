"""The Redis store backend for credentials, configured by the operator, never by a CR.

Keys are ``<prefix><namespace>/<name>``; the TTL follows what the stored token set
is still good for (its refresh token's lifetime when known, else its access
token's), so that Redis forgets credentials whose resource was deleted while the
operator was not running.

With an encryption key (``TOKENSYNC_REDIS_ENCRYPTION_KEY``: 32 random bytes,
base64), payloads are sealed with AES-256-GCM and the Redis key as associated
data: whoever can read Redis (a backup, a shared instance) sees no token, and an
entry copied under another credential's key does not open. Unsealed entries are
refused rather than trusted, so enabling encryption makes existing entries read
as absent once (credentials with a password or client secret simply grant again).

Several operators may share one Redis (replicas, or clusters): saves are
compare-and-swap, and each credential has a lease (``<key>:lease``) that the
controller holds while it presents a refresh token.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable

import redis.asyncio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tokensync.models.credential import OAuthCredential
from tokensync.models.settings import OperatorSettings
from tokensync.models.state import StoredCredential
from tokensync.models.tokens import utcnow
from tokensync.stores.base import AsyncCredentialStore, AsyncLease, LeaseGrant
from tokensync.stores.redis import AsyncRedisLease, AsyncRedisStore

__all__ = ["LeasedRedisStore", "PayloadCipher", "redis_key", "redis_store_factory", "stored_ttl"]


class PayloadCipher:
    """AES-256-GCM sealing of store payloads, bound to the key they are stored under."""

    PREFIX = b"tsenc1:"

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the Redis encryption key must be 32 bytes (base64 of 32 random bytes)")
        self._aead = AESGCM(key)

    @classmethod
    def from_base64(cls, text: str) -> PayloadCipher:
        try:
            return cls(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise ValueError("the Redis encryption key must be base64 of 32 random bytes") from None

    def seal(self, plaintext: bytes, *, bound_to: str) -> bytes:
        nonce = os.urandom(12)
        return self.PREFIX + base64.b64encode(nonce + self._aead.encrypt(nonce, plaintext, bound_to.encode()))

    def open(self, payload: str | bytes, *, bound_to: str) -> bytes:
        raw = payload.encode() if isinstance(payload, str) else payload
        if not raw.startswith(self.PREFIX):
            raise ValueError("not a sealed payload")
        blob = base64.b64decode(raw[len(self.PREFIX) :])
        return self._aead.decrypt(blob[:12], blob[12:], bound_to.encode())

    def __repr__(self) -> str:
        return "PayloadCipher(AES-256-GCM)"


class LeasedRedisStore(AsyncRedisStore[StoredCredential], AsyncLease):
    """A credential's compare-and-swap Redis store, and the lease next to it."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        key: str,
        serialize: Callable[[StoredCredential], str | bytes],
        deserialize: Callable[[str | bytes], StoredCredential],
    ) -> None:
        super().__init__(client, key, serialize, deserialize, ttl_seconds=stored_ttl, compare_and_swap=True)
        self._lease = AsyncRedisLease(client, f"{key}:lease")

    async def acquire(self, *, owner: str, ttl: float, guarding: str = "") -> LeaseGrant:
        return await self._lease.acquire(owner=owner, ttl=ttl, guarding=guarding)

    async def release(self, *, owner: str) -> None:
        await self._lease.release(owner=owner)


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
    client = redis.asyncio.Redis.from_url(settings.redis_url.get_secret_value())
    prefix = settings.redis_key_prefix
    key_text = settings.redis_encryption_key
    cipher = PayloadCipher.from_base64(key_text.get_secret_value()) if key_text is not None else None

    def factory(credential: OAuthCredential) -> AsyncCredentialStore[StoredCredential]:
        key = redis_key(prefix, credential.metadata.namespace, credential.metadata.name)
        serialize: Callable[[StoredCredential], str | bytes] = StoredCredential.to_json
        deserialize: Callable[[str | bytes], StoredCredential] = StoredCredential.from_json
        if cipher is not None:

            def serialize(value: StoredCredential) -> bytes:
                return cipher.seal(value.to_json().encode(), bound_to=key)

            def deserialize(payload: str | bytes) -> StoredCredential:
                return StoredCredential.from_json(cipher.open(payload, bound_to=key))

        return LeasedRedisStore(client, key, serialize, deserialize)

    return factory
