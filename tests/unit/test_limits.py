import asyncio
import time

import pytest

from tokensync.controller.limits import EndpointLimiter, TokenBucket


async def test_bucket_allows_a_burst_then_the_rate():
    bucket = TokenBucket(rate=20, burst=3)
    started = time.monotonic()
    waits = [await bucket.acquire() for _ in range(7)]
    elapsed = time.monotonic() - started
    assert waits[:3] == [0, 0, 0]
    assert all(w > 0 for w in waits[3:])
    assert elapsed >= 4 / 20 * 0.9  # four requests beyond the burst at 20/s


def test_bucket_refuses_nonsense():
    with pytest.raises(ValueError, match="rate must be positive"):
        TokenBucket(rate=0, burst=1)


async def test_limiter_caps_concurrency_per_host_and_hosts_do_not_wait_for_each_other():
    limiter = EndpointLimiter(concurrency=2, rate=1000, burst=1000)
    running: dict[str, int] = {"a": 0, "b": 0}
    peak: dict[str, int] = {"a": 0, "b": 0}

    async def request(host: str) -> None:
        async with limiter.slot(f"https://{host}.example/token"):
            running[host] += 1
            peak[host] = max(peak[host], running[host])
            await asyncio.sleep(0.02)
            running[host] -= 1

    await asyncio.gather(*(request("a") for _ in range(6)), *(request("b") for _ in range(6)))
    assert peak == {"a": 2, "b": 2}
