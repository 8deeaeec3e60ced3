"""
In-process stores: the default for a library user who only needs tokens fresh
for the lifetime of one process, and the reference implementation of the contract.

The value is kept by reference, not serialised: there is nothing to decode, so
the "undecodable payload" case cannot happen here. That is only safe for
immutable values, which is why :class:`~tokensync.models.TokenSet` is frozen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from tokensync.stores.base import AsyncCredentialStore, AsyncLease, CredentialStore, LeaseGrant

__all__ = ["AsyncMemoryStore", "MemoryStore"]

T = TypeVar("T")


class MemoryStore(CredentialStore[T]):
    """
    One value held in a Python attribute.

    No lock: a single attribute assignment or read is atomic under the GIL, and
    the contract asks for nothing more than last-writer-wins.
    """

    def __init__(self) -> None:
        self._value: T | None = None

    def __repr__(self) -> str:
        # The state, never the value: a repr ends up in logs and tracebacks.
        state = "empty" if self._value is None else "holding a value"
        return f"<{type(self).__name__} {state}>"

    def load(self) -> T | None:
        return self._value

    def save(self, value: T) -> None:
        self._value = value

    def clear(self) -> None:
        self._value = None


class AsyncMemoryStore(AsyncCredentialStore[T]):
    """
    The asyncio twin of :class:`MemoryStore`.

    No ``asyncio.Lock`` either: there is no ``await`` inside the operations, so
    no other task can interleave with them.
    """

    def __init__(self) -> None:
        self._value: T | None = None

    def __repr__(self) -> str:
        state = "empty" if self._value is None else "holding a value"
        return f"<{type(self).__name__} {state}>"

    async def load(self) -> T | None:
        return self._value

    async def save(self, value: T) -> None:
        self._value = value

    async def clear(self) -> None:
        self._value = None


class AsyncMemoryLease(AsyncLease):
    """A lease within one process: for tests, and for library users with one process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._holder: tuple[str, float, str] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {'held' if self._holder else 'free'}>"

    async def acquire(self, *, owner: str, ttl: float, guarding: str = "") -> LeaseGrant:
        now = self._clock()
        previous = self._holder
        if previous is not None and previous[0] != owner and previous[1] > now:
            return LeaseGrant(acquired=False)
        self._holder = (owner, now + ttl, guarding)
        return LeaseGrant(
            acquired=True, interrupted=previous is not None and bool(guarding) and previous[2] == guarding
        )

    async def release(self, *, owner: str) -> None:
        if self._holder is not None and self._holder[0] == owner:
            self._holder = None
