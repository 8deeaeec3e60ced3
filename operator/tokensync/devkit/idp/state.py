"""Process-wide runtime state of the identity provider that does not live in DOT's tables.

DOT's ``Application`` has one grant type and no notion of a registered
authentication method or public key, and Django's ``User`` has no TOTP seed. Rather
than swap DOT's models (and ship migrations), the per-client policy and the per-user
seed are kept here, loaded from :class:`~tokensync.devkit.idp.config.IdpConfig` at
start. Django settings are process-global anyway, so there is one IdP per process and
one :data:`STATE`.

Also here: the ``jti`` replay cache for client assertions and the token-request
counters. Both are touched by the threaded WSGI server's request threads, so every
access holds a lock.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from tokensync.devkit.idp.config import ClientConfig, IdpConfig, UserConfig

__all__ = ["STATE", "CountKey", "IdpState", "ReplayCache"]


@dataclass(frozen=True, slots=True)
class CountKey:
    """One bucket of the token-request counter: who asked, for what, and the answer."""

    client_id: str
    grant_type: str
    status: int


class ReplayCache:
    """Remembers ``(client_id, jti)`` pairs until the assertion's ``exp`` (RFC 7523 §3 item 7).

    An entry needs to outlive only its assertion: once ``exp`` passes, the signature
    check rejects a replay anyway, so expired entries are pruned on every insert.
    """

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def remember(self, client_id: str, jti: str, expires_at: float, *, now: float | None = None) -> bool:
        """Record a ``jti``; ``False`` if it was already used and has not expired."""
        current = time.time() if now is None else now
        with self._lock:
            self._seen = {key: exp for key, exp in self._seen.items() if exp > current}
            key = (client_id, jti)
            if key in self._seen:
                return False
            self._seen[key] = expires_at
            return True

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()


@dataclass
class IdpState:
    """The IdP's non-database state; see the module docstring for why it exists."""

    clients: dict[str, ClientConfig] = field(default_factory=dict)
    users: dict[str, UserConfig] = field(default_factory=dict)
    #: Where client assertions may be addressed (token endpoint, issuer), set at start.
    assertion_audiences: tuple[str, ...] = ()
    replay_cache: ReplayCache = field(default_factory=ReplayCache)
    _counts: Counter[CountKey] = field(default_factory=Counter)
    #: Presentations of a refresh token that was already revoked or rotated away,
    #: per client: a client that spends a refresh token twice (what reuse protection
    #: punishes by revoking the whole token family).
    _reused: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self, config: IdpConfig, extra_clients: Iterable[ClientConfig] = ()) -> None:
        """Replace the policies with the ones in ``config`` (plus built-in clients)."""
        with self._lock:
            self.clients = {c.client_id: c for c in (*config.clients, *extra_clients)}
            self.users = {u.username: u for u in config.users}

    def client(self, client_id: str | None) -> ClientConfig | None:
        """The registered policy of ``client_id``; ``None`` for clients made outside the config."""
        if not client_id:
            return None
        with self._lock:
            return self.clients.get(client_id)

    def totp_seed(self, username: str) -> str | None:
        """The base32 TOTP seed of ``username``, or ``None`` if the user has no second factor."""
        with self._lock:
            user = self.users.get(username)
        if user is None or user.totp_seed is None:
            return None
        return user.totp_seed.get_secret_value()

    def count(self, client_id: str, grant_type: str, status: int) -> None:
        """Count one served token request."""
        with self._lock:
            self._counts[CountKey(client_id, grant_type, status)] += 1

    def counts(self) -> dict[CountKey, int]:
        """A snapshot of the token-request counters."""
        with self._lock:
            return dict(self._counts)

    def count_reuse(self, client_id: str) -> None:
        """Count one presentation of an already-spent refresh token."""
        with self._lock:
            self._reused[client_id] += 1

    def reuse_counts(self) -> dict[str, int]:
        """A snapshot of the spent-refresh-token presentations, per client."""
        with self._lock:
            return dict(self._reused)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._reused.clear()


#: The one IdP state of this process.
STATE = IdpState()
