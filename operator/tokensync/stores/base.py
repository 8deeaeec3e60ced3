"""
Credential stores keep one value (usually a :class:`~tokensync.models.TokenSet`)
somewhere between two uses of it: in memory, in a file, in Redis, in the OS keyring.

A store is deliberately dumb: it holds *one* value under *one* name that the
caller chose (a path, a key, an endpoint), and knows nothing of OAuth2. Whatever
decides when a token is stale lives above it, in ``tokensync.auth``.

Invariants every implementation keeps (the contract tests in
``tests/unit/test_stores.py`` run the same assertions against every backend):

* ``load() -> T | None`` returns ``None`` when nothing is stored, *and* when the
  stored payload cannot be decoded. A damaged entry is the same as an absent one
  to the caller, who will simply log in or refresh again; it is never a crash.
  The store logs a warning in that case, and the warning never includes the
  payload nor the decoder's error text (pydantic echoes the input value in its
  messages, and the input value is the secret).
* ``save(value)`` replaces whatever was stored, entirely: no merging, and no
  leftovers of the previous value (e.g. a refresh token that the new value lacks).
* ``clear()`` is idempotent: clearing an empty store is not an error.
* ``load()`` never mutates: a damaged entry is left where it is for a human to see.
* Stores do not interpret expiry. The only exception is the Redis TTL, and even
  there the lifetime is given by the caller (a number or a function of the value).
* Backends never import each other (import-linter enforces it); each one depends
  on this module and on ``tokensync.models`` only.
* Stores never reveal what they hold: not in ``repr()``, not in logs, not in
  exception messages.
* :class:`StoreError` means "the backend itself is unreachable or failing" (Redis
  is down, the file is not readable). It is raised, not swallowed, because
  pretending that nothing is stored would make the caller re-authenticate in a
  loop against an identity provider while the real problem is the store.
  The keyring store is the one deliberate exception: it is a convenience for
  interactive use and degrades to "not persisted" with a single warning.

Serialisation is the caller's choice for the stores that need one (file, Redis):
``serialize: Callable[[T], str | bytes]`` and ``deserialize: Callable[[str | bytes], T]``.
For token sets, that is ``TokenSet.to_json`` and ``TokenSet.from_json``. The
decoder must accept both ``str`` and ``bytes``: which one it gets depends on the
backend and its configuration (e.g. ``decode_responses=True`` in Redis).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = [
    "AsyncCredentialStore",
    "AsyncLease",
    "CredentialStore",
    "Deserializer",
    "LeaseGrant",
    "Serializer",
    "StoreConflictError",
    "StoreError",
    "decode_or_none",
]

T = TypeVar("T")

Serializer = Callable[[T], str | bytes]
Deserializer = Callable[[str | bytes], T]


class StoreError(Exception):
    """
    The backend itself is unreachable or failing, not the value in it.

    Messages name the store (a path, a key) and the kind of failure, never the
    payload; the original backend exception is chained for debugging.
    """


class StoreConflictError(StoreError):
    """Someone else changed the stored value since this store last read or wrote it.

    Only stores that compare and swap raise it (the Kubernetes Secret store always,
    the Redis stores when asked to). The caller reloads: the other writer's value
    is the truth now, and overwriting it would strand whoever relies on it.
    """


class CredentialStore(Generic[T], metaclass=abc.ABCMeta):
    """
    Base class and interface of the synchronous stores.

    Small on purpose: three operations on one value. Anything richer (several
    values, listing, versioning) belongs to a store that knows more about its
    values, and would leak the backend's model into the token logic.
    """

    @abc.abstractmethod
    def load(self) -> T | None:
        raise NotImplementedError

    @abc.abstractmethod
    def save(self, value: T) -> None:
        raise NotImplementedError

    @abc.abstractmethod
    def clear(self) -> None:
        raise NotImplementedError

    def close(self) -> None:  # a hook, deliberately not abstract
        """Release what the store owns; most own nothing (clients are the caller's)."""


class AsyncCredentialStore(Generic[T], metaclass=abc.ABCMeta):
    """
    The asyncio twin of :class:`CredentialStore`, with the very same contract.

    A separate class rather than awaitable results on one class: a caller
    awaiting a sync store, or forgetting to await an async one, is then a type
    error instead of a silently un-run coroutine.
    """

    @abc.abstractmethod
    async def load(self) -> T | None:
        raise NotImplementedError

    @abc.abstractmethod
    async def save(self, value: T) -> None:
        raise NotImplementedError

    @abc.abstractmethod
    async def clear(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:  # a hook, deliberately not abstract
        """Release what the store owns; most own nothing (clients are the caller's)."""


def decode_or_none(
    deserialize: Deserializer[T],
    payload: str | bytes,
    *,
    logger: logging.Logger,
    where: str,
) -> T | None:
    """
    Decode a stored payload, or warn and give ``None`` when it is damaged.

    Any exception of the caller's decoder counts as "undecodable": the decoder is
    arbitrary code, and a store that crashes on a half-written or foreign entry
    locks the user out until someone deletes it by hand. Only the exception's
    *type* is logged: its text may quote the payload (pydantic does).
    """
    try:
        return deserialize(payload)
    except Exception as exc:
        logger.warning(
            "Ignoring an undecodable credential in %s (%s); treating it as absent.",
            where,
            type(exc).__name__,
        )
        return None


@dataclass(frozen=True)
class LeaseGrant:
    """The answer of :meth:`AsyncLease.acquire`; true when the lease is now held."""

    acquired: bool
    #: A lease guarding the same value was left behind by a holder that never
    #: released it (it expired, or it was this owner's before a restart): that
    #: holder may have used the value and died before recording the outcome.
    interrupted: bool = False

    def __bool__(self) -> bool:
        return self.acquired


class AsyncLease(metaclass=abc.ABCMeta):
    """
    A per-credential lock across processes: an owner token and a time to live.

    Why: a rotating refresh token may be presented once. Two processes holding
    the same one (two operator replicas during a rolling update, two clusters on
    one Redis) must not both present it, or the identity provider revokes the
    whole token family. The holder of the lease refreshes; the others wait and
    then read the winner's token set from the store.

    Invariants every implementation keeps:

    * ``acquire`` never waits: it answers at once whether ``owner`` holds the lease
      now, for ``ttl`` seconds from now. A lease already held by the same owner is
      renewed (a restarted process with the same identity takes its own lease back
      instead of waiting out its dead predecessor).
    * An expired lease is free: a holder that crashed blocks the others for at
      most ``ttl``.
    * The lease records what it guards (``guarding``, an opaque tag such as a hash
      of the refresh token about to be presented), durably, until it is released.
      Taking over a lease that was never released and guarded the same tag answers
      ``interrupted=True``: its holder died between using the value and recording
      the result, so the value may be spent. That record is what makes a crash
      mid-refresh detectable after a restart.
    * ``release`` frees the lease only if ``owner`` still holds it; releasing a
      lease that expired and was taken by someone else is a no-op, never a theft.
    * Failures to reach the backend are :class:`StoreError`, as for stores: the
      caller must tell "someone else holds it" (not acquired) from "cannot know".
    """

    @abc.abstractmethod
    async def acquire(self, *, owner: str, ttl: float, guarding: str = "") -> LeaseGrant:
        raise NotImplementedError

    @abc.abstractmethod
    async def release(self, *, owner: str) -> None:
        raise NotImplementedError
