import asyncio
import itertools
from datetime import UTC, datetime, timedelta

from pydantic import SecretStr

from tokensync.controller.schedule import Scheduler, backoff_delay, refresh_time
from tokensync.models.credential import RefreshSpec
from tokensync.models.tokens import TokenSet

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def token(lifetime: float | None) -> TokenSet:
    return TokenSet(
        access_token=SecretStr("test-secret-at"),
        issued_at=T0,
        expires_at=T0 + timedelta(seconds=lifetime) if lifetime is not None else None,
    )


def due(lifetime, jitter=0.0, **spec):
    return (
        refresh_time(token(lifetime), RefreshSpec(**spec), identity="ns/a", jitter_fraction=jitter) - T0
    ).total_seconds()


def test_default_is_80_percent_of_the_issued_lifetime():
    assert due(30) == 24
    assert due(3600) == 2880


def test_default_is_at_least_two_minutes_before_expiry_when_the_lifetime_allows():
    assert due(300) == 180  # 80% would leave only 60 s for the kubelet to propagate
    assert due(600) == 480


def test_two_minute_lead_never_takes_more_than_half_the_lifetime():
    assert due(200) == 160  # 2 minutes before expiry would be 80 s, under half: keep 80%


def test_renew_before_and_percentage():
    assert due(3600, renewBefore="10m") == 3000
    assert due(3600, renewBeforePercentage=25) == 2700


def test_min_interval_guards_against_hot_loops_but_never_past_expiry():
    assert due(30, minInterval="20s") == 24
    assert due(30, minInterval="28s") == 28
    assert due(5, minInterval="1m") == 5


def test_default_guard_scales_down_for_very_short_tokens():
    assert due(4) == 3.2
    assert due(1) == 1  # half of 1 s would be under the 1 s floor; never past expiry


def test_a_token_expired_on_arrival_is_not_renewed_in_a_loop():
    assert due(0) >= 1


def test_unknown_expiry_refreshes_hourly():
    assert due(None) == 3600


def test_jitter_only_moves_earlier_and_is_stable_for_the_same_token():
    plain = due(1000)
    jittered = due(1000, jitter=0.05)
    assert plain - 50 <= jittered <= plain
    assert due(1000, jitter=0.05) == jittered


def test_backoff_grows_from_initial_to_maximum_and_honours_retry_after():
    delays = [backoff_delay(n, initial=5, maximum=300, identity="x") for n in range(1, 10)]
    assert 4 <= delays[0] <= 6
    assert delays[-1] == 300
    assert all(b >= a * 1.3 for a, b in itertools.pairwise(delays[:6]))
    assert backoff_delay(1, initial=5, maximum=300, identity="x", retry_after=60) == 60


def test_backoff_never_jumps_past_the_expiry_of_a_token_still_valid():
    plain = [backoff_delay(n, initial=5, maximum=300, identity="x") for n in range(1, 10)]
    capped = [backoff_delay(n, initial=5, maximum=300, identity="x", valid_for=40) for n in range(1, 10)]
    assert capped[:2] == plain[:2]  # far from expiry: plain backoff
    assert max(capped) == 20  # then at most half of what is left
    # Closing in on the expiry: waits halve, down to one second, and the attempt
    # sequence reaches the last second before expiry.
    left, attempts_at = 12.0, []
    for attempt in range(1, 20):
        attempts_at.append(left)
        left -= backoff_delay(attempt, initial=5, maximum=300, identity="x", valid_for=left)
        if left <= 0:
            break
    assert 0 < attempts_at[-1] <= 1.0, attempts_at  # an attempt in the token's last second
    assert len(attempts_at) <= 7  # ...after a handful of attempts, not a storm
    # Expired, or unknown: plain backoff. An IdP's Retry-After still wins.
    assert backoff_delay(6, initial=5, maximum=300, identity="x", valid_for=-3) == plain[5]
    assert backoff_delay(1, initial=5, maximum=300, identity="x", retry_after=30, valid_for=10) == 30


async def test_scheduler_runs_due_keys_once_each_and_respects_order():
    ran: list[str] = []
    now = [1000.0]

    async def work(key):
        ran.append(key)

    scheduler = Scheduler(work, concurrency=2, clock=lambda: now[0])
    task = asyncio.create_task(scheduler.run())
    scheduler.schedule("later", 1005.0)
    scheduler.schedule("now", 999.0)
    scheduler.schedule("now", 999.0)
    await scheduler.wait_idle()
    assert ran == ["now"]
    now[0] = 1006.0
    scheduler.run_now("ping")  # wakes the loop
    await scheduler.wait_idle()
    assert sorted(ran) == ["later", "now", "ping"]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_scheduler_never_runs_a_key_twice_at_once_and_reruns_after():
    running = 0
    peak = 0
    runs = 0
    gate = asyncio.Event()

    async def work(key):
        nonlocal running, peak, runs
        running += 1
        runs += 1
        peak = max(peak, running)
        if runs == 1:
            await gate.wait()
        running -= 1

    scheduler = Scheduler(work, concurrency=4)
    task = asyncio.create_task(scheduler.run())
    scheduler.run_now("k")
    await asyncio.sleep(0.05)
    scheduler.run_now("k")  # due again while running
    await asyncio.sleep(0.05)
    gate.set()
    await scheduler.wait_idle()
    assert peak == 1
    assert runs == 2
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_scheduler_survives_a_crashing_work_item():
    seen = []

    async def work(key):
        seen.append(key)
        if key == "bad":
            raise RuntimeError("bug")

    scheduler = Scheduler(work, concurrency=1)
    task = asyncio.create_task(scheduler.run())
    scheduler.run_now("bad")
    scheduler.run_now("good")
    await asyncio.sleep(0.1)
    assert "good" in seen
    assert scheduler.due_time("bad") is not None  # retried later, not lost
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_cancelled_keys_do_not_run():
    seen = []

    async def work(key):
        seen.append(key)

    scheduler = Scheduler(work, concurrency=1)
    scheduler.schedule("gone", 0)
    scheduler.cancel("gone")
    task = asyncio.create_task(scheduler.run())
    await asyncio.sleep(0.05)
    assert seen == []
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_stopping_lets_work_in_flight_finish_within_the_grace_period():
    finished = []

    async def work(key):
        await asyncio.sleep(0.2)  # a token request and its store write
        finished.append(key)

    scheduler = Scheduler(work, concurrency=2, grace=5)
    task = asyncio.create_task(scheduler.run())
    scheduler.run_now("a")
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert finished == ["a"]
