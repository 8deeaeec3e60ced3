"""
Where token sets live between two uses: ``CredentialStore[T]`` and its backends.

The contract (what ``load``, ``save`` and ``clear`` promise) is in
:mod:`tokensync.stores.base`. Backends are independent of each other and import
their optional dependencies (Redis, keyring) themselves; this package only
gathers the public names.
"""

from __future__ import annotations

from tokensync.stores.base import AsyncCredentialStore, AsyncLease, CredentialStore, StoreConflictError, StoreError
from tokensync.stores.file import FileStore
from tokensync.stores.keyring import KeyringStore
from tokensync.stores.memory import AsyncMemoryLease, AsyncMemoryStore, MemoryStore
from tokensync.stores.redis import AsyncRedisLease, AsyncRedisStore, RedisStore

__all__ = [
    "AsyncCredentialStore",
    "AsyncLease",
    "AsyncMemoryLease",
    "AsyncMemoryStore",
    "AsyncRedisLease",
    "AsyncRedisStore",
    "CredentialStore",
    "FileStore",
    "KeyringStore",
    "MemoryStore",
    "RedisStore",
    "StoreConflictError",
    "StoreError",
]
