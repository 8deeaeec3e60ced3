"""Per-identity-provider limits on token requests: a concurrency cap and a token bucket.

Identity providers rate-limit token endpoints (Okta: 4 requests/s per user for
password and refresh grants; Auth0's free plan: 30/s; Entra answers 429 with
``Retry-After: 60``). An operator restarted with thousands of credentials that
all need a token, or a burst of new credentials, must queue rather than hammer
the IdP into throttling everyone. Limits are per endpoint host, because that is
what a provider's limits are attached to, and credentials of different IdPs
never wait for each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

__all__ = ["EndpointLimiter", "TokenBucket"]


class TokenBucket:
    """``rate`` requests per second on average, ``burst`` at once; waiters are served in order."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._updated = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now

    async def acquire(self) -> float:
        """Take one token, waiting as long as needed; returns the seconds waited."""
        waited = 0.0
        async with self._lock:  # FIFO: a waiter holds the lock while it sleeps for its token
            self._refill()
            while self._tokens < 1:
                delay = (1 - self._tokens) / self._rate
                await asyncio.sleep(delay)
                waited += delay
                self._refill()
            self._tokens -= 1
        return waited


class EndpointLimiter:
    """One concurrency cap and one token bucket per token endpoint host."""

    def __init__(self, *, concurrency: int, rate: float, burst: int) -> None:
        self._concurrency = concurrency
        self._rate = rate
        self._burst = burst
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self.waited = 0.0  # total seconds spent waiting for the rate limit (for metrics and tests)

    @contextlib.asynccontextmanager
    async def slot(self, token_url: str) -> AsyncIterator[None]:
        host = urlsplit(token_url).netloc.lower()
        semaphore = self._slots.setdefault(host, asyncio.Semaphore(self._concurrency))
        bucket = self._buckets.setdefault(host, TokenBucket(self._rate, self._burst))
        async with semaphore:
            self.waited += await bucket.acquire()
            yield
