"""When to renew each credential, and one scheduler task for all of them.

Refresh time (per credential, from the *issued* lifetime, as cert-manager does):

* ``renewBefore``: that long before expiry;
* ``renewBeforePercentage``: that share of the lifetime before expiry;
* default: at 80% of the lifetime (the kubelet's rule for projected
  service-account tokens), and never later than 2 minutes before expiry when the
  lifetime allows it, because a mounted Secret reaches pods only after the
  kubelet's sync period (about a minute) plus cache propagation;
* never sooner than ``minInterval`` after issue (a guard against hot loops when a
  server hands out very short tokens; by default 10 seconds, or half the lifetime
  for tokens shorter than 20 seconds), and never after expiry.

Jitter moves refreshes *earlier* by up to a small share of the lifetime, so that
credentials created together spread out. It is derived from the credential's
identity and issue time rather than drawn at random: the same token set gives the
same refresh time after an operator restart, so a restart rewrites no status.

Backoff after a failure grows exponentially from ``initial`` to ``maximum`` with the
same deterministic jitter, and a server's ``Retry-After`` is a floor.

One :class:`Scheduler` task serves every credential: a heap of due times, not a
task or timer per object, so ten thousand credentials cost ten thousand heap
entries rather than ten thousand sleeping tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from datetime import datetime, timedelta

from tokensync.models.credential import RefreshSpec, parse_duration
from tokensync.models.tokens import TokenSet

__all__ = ["Scheduler", "backoff_delay", "before_expiry", "refresh_time", "stable_fraction"]

logger = logging.getLogger("tokensync.scheduler")

DEFAULT_PERCENT_USED = 0.8
PROPAGATION_LEAD = timedelta(minutes=2)
UNKNOWN_EXPIRY_INTERVAL = timedelta(hours=1)
DEFAULT_MIN_INTERVAL = timedelta(seconds=10)


def stable_fraction(*parts: object) -> float:
    """A number in [0, 1) that depends only on ``parts``."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def refresh_time(token_set: TokenSet, spec: RefreshSpec, *, identity: str, jitter_fraction: float) -> datetime:
    """The instant at which this token set should be renewed."""
    issued = token_set.issued_at
    expires = token_set.expires_at
    if expires is None:
        return issued + max(UNKNOWN_EXPIRY_INTERVAL, timedelta(seconds=spec.effective_min_interval()))
    lifetime = expires - issued
    if spec.min_interval is not None:
        min_interval = timedelta(seconds=spec.effective_min_interval())
    else:
        # The default guard must not push short tokens past their expiry: half the
        # lifetime, between 1 and 10 seconds.
        min_interval = max(timedelta(seconds=1), min(DEFAULT_MIN_INTERVAL, lifetime / 2))
    if spec.renew_before is not None:
        due = expires - parse_duration(spec.renew_before)
    elif spec.renew_before_percentage is not None:
        due = expires - lifetime * (spec.renew_before_percentage / 100)
    else:
        due = issued + lifetime * DEFAULT_PERCENT_USED
        latest = expires - PROPAGATION_LEAD
        if latest - issued >= lifetime / 2:
            due = min(due, latest)
    if jitter_fraction > 0:
        due -= lifetime * jitter_fraction * stable_fraction(identity, issued.isoformat())
    due = max(due, issued + min_interval)
    # Never after expiry, but never sooner than the guard either: a token that
    # arrives (nearly) expired must not turn into a renewal loop.
    return max(min(due, expires), issued + min(min_interval, timedelta(seconds=1)))


#: The closest two attempts come while a token is about to expire.
MIN_RETRY_SPACING = 1.0


def before_expiry(delay: float, valid_for: float | None, *, floor: float = MIN_RETRY_SPACING) -> float:
    """``delay``, but while ``valid_for`` > 0 at most half of it (never under ``floor``).

    Waits that close in on the expiry of the token pods hold instead of jumping past it.
    """
    if valid_for is None or valid_for <= 0:
        return delay
    return min(delay, max(floor, valid_for / 2))


def backoff_delay(
    attempts: int,
    *,
    initial: float,
    maximum: float,
    identity: str,
    retry_after: float | None = None,
    valid_for: float | None = None,
) -> float:
    """Seconds to wait before attempt ``attempts + 1``: exponential, jittered, capped.

    ``valid_for``: how long the token pods hold now stays valid. Plain backoff would
    let an attempt land long after that expiry (5 s doubling reaches 80 s within
    about 2.5 minutes), so an outage shorter than the token's remaining life would
    still leave pods an expired token. While the token is valid, the wait is at most
    half of what is left (never under MIN_RETRY_SPACING): attempts close in on the
    expiry instead of jumping past it. An IdP's Retry-After still wins: it asked.
    """
    base = min(maximum, initial * 2 ** max(0, attempts - 1))
    jittered = base * (0.8 + 0.4 * stable_fraction(identity, attempts))
    delay = before_expiry(min(maximum, jittered), valid_for)
    if retry_after is not None:
        delay = max(delay, min(retry_after, 3600.0))
    return delay


class Scheduler:
    """Runs ``work(key)`` at each key's due time, at most ``concurrency`` at once.

    Invariants: a key has at most one pending due time (scheduling it again
    replaces the previous one); a key never runs twice concurrently (a key that
    becomes due while running runs again right after); :meth:`cancel` forgets it.
    Times are wall-clock epoch seconds, because they come from token expiries.
    """

    def __init__(
        self,
        work: Callable[[Hashable], Awaitable[None]],
        *,
        concurrency: int,
        clock: Callable[[], float] = time.time,
        grace: float = 20.0,
    ) -> None:
        self._work = work
        self._grace = grace
        self._clock = clock
        self._due: dict[Hashable, float] = {}
        self._heap: list[tuple[float, int, Hashable]] = []
        self._seq = 0
        self._running: set[Hashable] = set()
        self._again: set[Hashable] = set()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def schedule(self, key: Hashable, when: float) -> None:
        """Run ``key`` at ``when`` (or now, if that has passed); replaces an earlier plan."""
        current = self._due.get(key)
        if current is not None and current == when:
            return
        self._due[key] = when
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, key))
        if self._heap[0][2] == key or when <= self._clock():
            self._wakeup.set()

    def run_now(self, key: Hashable) -> None:
        self.schedule(key, self._clock())

    def cancel(self, key: Hashable) -> None:
        self._due.pop(key, None)
        self._again.discard(key)

    def running(self, key: Hashable) -> bool:
        return key in self._running

    def due_time(self, key: Hashable) -> float | None:
        return self._due.get(key)

    @property
    def pending(self) -> int:
        return len(self._due)

    async def wait_idle(self) -> None:
        """Until nothing is due now and nothing runs (for tests and the demo's ``--once``)."""
        while True:
            await self._idle.wait()
            if not self._running and not any(w <= self._clock() for w in self._due.values()):
                return
            self._idle.clear()
            await asyncio.sleep(0.01)

    async def run(self) -> None:
        """The scheduler loop; cancel the task to stop it (running work is cancelled too)."""
        try:
            while True:
                now = self._clock()
                while self._heap and self._heap[0][0] <= now:
                    when, _, key = heapq.heappop(self._heap)
                    if self._due.get(key) != when:
                        continue  # superseded or cancelled
                    del self._due[key]
                    if key in self._running:
                        self._again.add(key)
                        continue
                    await self._slots.acquire()
                    self._start(key)
                self._wakeup.clear()
                if not self._running:
                    self._idle.set()
                timeout = max(0.0, self._heap[0][0] - self._clock()) if self._heap else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=timeout)
        finally:
            # Let renewals in flight finish: cancelling one between the token
            # request and the store write would lose a rotated refresh token. Only
            # what outlives the grace period (below Kubernetes' default 30 s) is
            # cancelled.
            if self._tasks:
                _, late = await asyncio.wait(set(self._tasks), timeout=self._grace)
                for task in late:
                    task.cancel()
                if late:
                    await asyncio.gather(*late, return_exceptions=True)

    def _start(self, key: Hashable) -> None:
        self._running.add(key)
        self._idle.clear()
        task = asyncio.get_running_loop().create_task(self._run_one(key), name=f"tokensync:{key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_one(self, key: Hashable) -> None:
        try:
            await self._work(key)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The work function handles its own failures; this is a bug net that
            # keeps one credential's bug from stopping every other credential.
            logger.exception("unexpected error while renewing %s; retrying in 60s", key)
            self.schedule(key, self._clock() + 60)
        finally:
            self._running.discard(key)
            self._slots.release()
            if key in self._again:
                self._again.discard(key)
                self.schedule(key, self._clock())
            self._wakeup.set()
