"""Token managers: a valid access token on demand, refreshed at most once at a time.

:class:`TokenManager` (over ``httpx.Client``, for threads) and
:class:`AsyncTokenManager` (over ``httpx.AsyncClient``, for asyncio) keep one
contract and share one decision logic (:func:`tokensync.auth.flow.renew_flow`);
they only differ in how they wait and send.

Single flight: the fast path reads the in-memory token set without a lock. When it
is missing or about to expire, callers take the lock and *check again inside it*,
because another caller may have renewed it while they waited. Ten concurrent
callers of an expired token therefore cause exactly one token request. The same
re-check makes :meth:`force_refresh` cheap under a burst of 401s: only the first
caller renews, the others see that the token they were refused has already been
replaced.

Stores: a store shared by several processes (a CLI's file store) may have been
renewed by another process, so inside the lock the store is read again and the
newer token set wins. This narrows, but does not close, the window in which two
processes both renew; cross-process exclusion is the operator's job.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Generator
from datetime import datetime
from typing import Any, Protocol

import httpx

from tokensync.auth.errors import (
    ConfigurationError,
    EndpointUnreachableError,
    InvalidResponseError,
    ResponseLostError,
    TokenError,
)
from tokensync.auth.flow import Persist, Post, Step, parse_token_response, renew_flow
from tokensync.auth.providers import AuthProvider
from tokensync.models.tokens import TokenSet, utcnow

__all__ = ["AsyncTokenManager", "AsyncTokenStore", "Superseded", "TokenManager", "TokenStore"]

logger = logging.getLogger("tokensync.auth")


class TokenStore(Protocol):
    """What a manager needs of a store; every ``CredentialStore[TokenSet]`` fits."""

    def load(self) -> TokenSet | None: ...
    def save(self, value: TokenSet) -> None: ...
    def clear(self) -> None: ...


class AsyncTokenStore(Protocol):
    """The async twin of :class:`TokenStore`; every ``AsyncCredentialStore[TokenSet]`` fits."""

    async def load(self) -> TokenSet | None: ...
    async def save(self, value: TokenSet) -> None: ...
    async def clear(self) -> None: ...


class Superseded(Exception):
    """Raised by a store's ``save``: another process stored a newer token set; use it instead.

    The manager adopts :attr:`token_set` and returns it, and never retries its own:
    the other process may already rely on the refresh token it stored.
    """

    def __init__(self, token_set: TokenSet) -> None:
        super().__init__("another process stored a newer token set")
        self.token_set = token_set


def transport_error(exc: Exception) -> TokenError:
    """Classify an httpx failure by whether the request may have been processed."""
    name = type(exc).__name__
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return EndpointUnreachableError(f"token endpoint unreachable ({name})")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return ConfigurationError(f"token URL cannot be used ({name})")
    if isinstance(exc, httpx.TimeoutException | httpx.NetworkError | httpx.ProtocolError):
        return ResponseLostError(f"token request sent but its response was lost ({name})")
    return InvalidResponseError(f"token endpoint response unusable ({name})")


class _ManagerBase:
    """State and decisions common to both managers; no I/O here."""

    def __init__(self, provider: AuthProvider, *, token_url: str, expiry_skew: float, serve_unsaved: bool) -> None:
        if expiry_skew < 0:
            raise ValueError("expiry_skew must not be negative")
        self.provider = provider
        self.token_url = token_url
        self.expiry_skew = expiry_skew
        self.serve_unsaved = serve_unsaved
        # Why the last save or load failed (None once the store works again); only
        # kept with serve_unsaved, where the failure is not raised to the caller.
        self.store_error: Exception | None = None
        self._current: TokenSet | None = None
        # A token set the store refused: it is held in memory only, so it is not
        # served until a later save succeeds (the store must never be behind a
        # rotated refresh token that callers are already relying on).
        self._unsaved: TokenSet | None = None

    @property
    def token_set(self) -> TokenSet | None:
        """The token set held in memory, as is (no I/O, may be expired)."""
        return self._current

    @property
    def pending_save(self) -> bool:
        """A token set is held in memory only, waiting for the store to take it."""
        return self._unsaved is not None

    def _usable(self, token_set: TokenSet | None) -> bool:
        return (
            token_set is not None
            and (self._unsaved is None or self.serve_unsaved)
            and token_set.access_valid(self.expiry_skew)
        )

    def _store_failed(self, exc: Exception, action: str) -> None:
        if not self.serve_unsaved or self._current is None:
            raise exc
        self.store_error = exc
        logger.warning("the token store failed to %s (%s); serving the token set held in memory", action, exc)

    def _superseded(self, signal: Superseded) -> TokenSet:
        self._current, self._unsaved, self.store_error = signal.token_set, None, None
        logger.info("another process stored a newer token set; using it")
        return signal.token_set

    def _newest(self, stored: TokenSet | None) -> TokenSet | None:
        current = self._current
        if self._unsaved is not None:
            return current
        if stored is not None and (current is None or stored.issued_at >= current.issued_at):
            self._current = stored
        return self._current

    def _flow(self, current: TokenSet | None) -> Generator[Step, Any, TokenSet]:
        return renew_flow(self.provider, current, token_url=self.token_url, refresh_skew=self.expiry_skew)

    def _renewed_elsewhere(self, seen: TokenSet | None, current: TokenSet | None) -> bool:
        if seen is None or current is None or not self._usable(current):
            return False
        return current.access_token.get_secret_value() != seen.access_token.get_secret_value()

    @staticmethod
    def _parse(step: Post, response: httpx.Response, *, sent: datetime) -> TokenSet:
        # expires_in counts from when the IdP issued the token, somewhere between
        # sending and hearing back: counting from the send never overstates it.
        token_set = parse_token_response(
            response.status_code,
            response.headers,
            response.content,
            secrets=step.secrets,
            previous_refresh_token=step.previous_refresh_token,
            now=sent,
        )
        logger.info(
            "token issued by %s grant (expires in %s)",
            step.grant_type,
            f"{token_set.lifetime:.0f}s" if token_set.lifetime is not None else "unknown",
        )
        return token_set

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.provider!r}, token_url={self.token_url!r})"


class TokenManager(_ManagerBase):
    """Thread-safe access tokens over a synchronous ``httpx.Client``."""

    def __init__(
        self,
        provider: AuthProvider,
        *,
        http: httpx.Client,
        token_url: str,
        store: TokenStore | None = None,
        expiry_skew: float = 30.0,
        serve_unsaved: bool = False,
    ) -> None:
        super().__init__(provider, token_url=token_url, expiry_skew=expiry_skew, serve_unsaved=serve_unsaved)
        self._http = http
        self._store = store
        self._lock = threading.Lock()

    def token(self) -> TokenSet:
        """A token set whose access token is valid for more than ``expiry_skew`` seconds."""
        current = self._current
        if current is not None and self._unsaved is None and self._usable(current):
            return current
        with self._lock:
            current = self._reload()
            if current is not None and self._usable(current):
                return current
            return self._drive(self._flow(current))

    def authorization_header(self) -> str:
        """The ``Authorization`` header value for the next request."""
        return self.token().authorization_header

    def force_refresh(self) -> TokenSet:
        """Renew now, because a resource server refused the current token (HTTP 401)."""
        seen = self._current
        with self._lock:
            current = self._reload()
            if self._renewed_elsewhere(seen, current):
                assert current is not None
                return current
            return self._drive(self._flow(current))

    def clear(self) -> None:
        """Forget every token, in memory and in the store (a logout)."""
        with self._lock:
            self._current = self._unsaved = None
            if self._store is not None:
                self._store.clear()

    def _reload(self) -> TokenSet | None:
        if self._store is None:
            return self._current
        if self._unsaved is not None:
            try:
                self._persist(self._unsaved)
            except Superseded as signal:
                return self._superseded(signal)
            return self._current
        try:
            stored = self._store.load()
        except Exception as exc:
            self._store_failed(exc, "load")
            return self._current
        return self._newest(stored)

    def _persist(self, token_set: TokenSet) -> None:
        self._current = token_set
        if self._store is None:
            return
        self._unsaved = token_set
        try:
            self._store.save(token_set)
        except Superseded:
            raise
        except Exception as exc:
            self._store_failed(exc, "save")
            return
        self._unsaved = self.store_error = None

    def _drive(self, flow: Generator[Step, Any, TokenSet]) -> TokenSet:
        try:
            step = next(flow)
            while True:
                if isinstance(step, Persist):
                    try:
                        self._persist(step.token_set)
                    except Superseded as signal:
                        flow.close()
                        return self._superseded(signal)
                    step = flow.send(None)
                    continue
                try:
                    result = self._send(step)
                except TokenError as exc:
                    step = flow.throw(exc)
                else:
                    step = flow.send(result)
        except StopIteration as stop:
            token_set: TokenSet = stop.value
            return token_set

    def _send(self, step: Post) -> TokenSet:
        sent = utcnow()
        try:
            response = self._http.post(self.token_url, data=step.data, headers=step.headers)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise transport_error(exc) from None
        return self._parse(step, response, sent=sent)


class AsyncTokenManager(_ManagerBase):
    """Task-safe access tokens over an ``httpx.AsyncClient``: the operator's manager."""

    def __init__(
        self,
        provider: AuthProvider,
        *,
        http: httpx.AsyncClient,
        token_url: str,
        store: AsyncTokenStore | None = None,
        expiry_skew: float = 30.0,
        serve_unsaved: bool = False,
    ) -> None:
        super().__init__(provider, token_url=token_url, expiry_skew=expiry_skew, serve_unsaved=serve_unsaved)
        self._http = http
        self._store = store
        self._lock = asyncio.Lock()

    async def token(self) -> TokenSet:
        """A token set whose access token is valid for more than ``expiry_skew`` seconds."""
        current = self._current
        if current is not None and self._unsaved is None and self._usable(current):
            return current
        async with self._lock:
            current = await self._reload()
            if current is not None and self._usable(current):
                return current
            return await self._drive(self._flow(current))

    async def authorization_header(self) -> str:
        """The ``Authorization`` header value for the next request."""
        return (await self.token()).authorization_header

    async def force_refresh(self) -> TokenSet:
        """Renew now, because a resource server refused the current token (HTTP 401)."""
        seen = self._current
        async with self._lock:
            current = await self._reload()
            if self._renewed_elsewhere(seen, current):
                assert current is not None
                return current
            return await self._drive(self._flow(current))

    async def clear(self) -> None:
        """Forget every token, in memory and in the store (a logout)."""
        async with self._lock:
            self._current = self._unsaved = None
            if self._store is not None:
                await self._store.clear()

    async def _reload(self) -> TokenSet | None:
        if self._store is None:
            return self._current
        if self._unsaved is not None:
            try:
                await self._persist(self._unsaved)
            except Superseded as signal:
                return self._superseded(signal)
            return self._current
        try:
            stored = await self._store.load()
        except Exception as exc:
            self._store_failed(exc, "load")
            return self._current
        return self._newest(stored)

    async def _persist(self, token_set: TokenSet) -> None:
        self._current = token_set
        if self._store is None:
            return
        self._unsaved = token_set
        try:
            await self._store.save(token_set)
        except Superseded:
            raise
        except Exception as exc:
            self._store_failed(exc, "save")
            return
        self._unsaved = self.store_error = None

    async def _drive(self, flow: Generator[Step, Any, TokenSet]) -> TokenSet:
        try:
            step = next(flow)
            while True:
                if isinstance(step, Persist):
                    try:
                        await self._persist(step.token_set)
                    except Superseded as signal:
                        flow.close()
                        return self._superseded(signal)
                    step = flow.send(None)
                    continue
                try:
                    result = await self._send(step)
                except TokenError as exc:
                    step = flow.throw(exc)
                else:
                    step = flow.send(result)
        except StopIteration as stop:
            token_set: TokenSet = stop.value
            return token_set

    async def _send(self, step: Post) -> TokenSet:
        sent = utcnow()
        try:
            response = await self._http.post(self.token_url, data=step.data, headers=step.headers)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise transport_error(exc) from None
        return self._parse(step, response, sent=sent)
