"""Identity-provider faults through a proxy in front of the real IdP, with the real operator.

What pods see is sampled all along: a Secret must never hold an expired token while
an outage is shorter than the time a renewal leaves before expiry.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from support.faults import (
    CC_CLIENT,
    GARBAGE,
    LOSE,
    PASSWORD_CLIENT,
    RESET,
    RT_ONLY_CLIENT,
    STATUS,
    FaultProxy,
    SecretSampler,
    credential_world,
    request_refresh,
    tally_harm,
    valid_token_problems,
)
from support.operator import Cluster, eventually, running_operator, wait_until
from tokensync.models.settings import OperatorSettings

# Tokens live 20 s and are renewed when 60% of that is left: every renewal leaves 12 s
# before expiry, more than any outage below (at most ~7 s including the IdP's restart
# and the operator's next retry), so no Secret may ever hold an expired token.
LIFETIME = 20
REFRESH = {"renewBeforePercentage": 60}
OUTAGE = 4.0
SETTINGS = {"backoff_initial": 0.5, "backoff_max": 2.0, "metrics_port": 0}


def _recovered(cluster: Cluster, names: list[str], stamp: str) -> bool:
    for name in names:
        status = (cluster.credential(name) or {}).get("status") or {}
        if status.get("handledRefreshRequest") != stamp or not cluster.ready(name):
            return False
    return True


def test_identity_provider_errors_and_outages(counts, kube, kube_api, make_idp):
    """IdP down, 5xx, garbage, resets, lost responses"""
    idp = make_idp(fresh=True, access_token_lifetime=LIFETIME)
    cluster = Cluster(kube_api)
    reuse_before_restarts = 0
    with FaultProxy(idp.url) as proxy:
        specs = credential_world(cluster, idp, proxy.token_url, refresh=REFRESH)
        names = list(specs)
        sampler = SecretSampler([(kube.url, "default", n) for n in names], introspect=lambda t: idp.introspect(t))
        with running_operator(kube.url, settings=OperatorSettings(**SETTINGS)), sampler:
            cluster.apply_until_ready(specs)

            def phase(label: str, start: Callable[[], None], stop: Callable[[], None], hold: float) -> None:
                """Start a fault, ask every credential for a new token, end the fault; then
                each must have renewed (the manual refresh handled) and be Ready again."""
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + f"-{label}"
                before = proxy.faults + proxy.upstream_failures
                start()
                for name in names:
                    request_refresh(kube.url, "default", name, stamp)
                deadline = time.monotonic() + hold
                wait_until(lambda: proxy.faults + proxy.upstream_failures - before >= 2, timeout=10,
                           what=f"{label}: the operator met the fault")  # fmt: skip
                time.sleep(max(0.0, deadline - time.monotonic()))  # the fault lasts this long
                stop()
                counts.details.append(f"{label}: {proxy.faults + proxy.upstream_failures - before} requests faulted")
                counts.check(
                    eventually(lambda: _recovered(cluster, names, stamp), 25),
                    f"{label}: not every credential renewed and went Ready after the fault: "
                    + str({n: (cluster.condition(n) or {}).get("reason") for n in names}),
                )

            def idp_down() -> None:
                nonlocal reuse_before_restarts
                reuse_before_restarts += idp.admin.refresh_token_reuse_count()  # counters live in the process
                idp.stop()
                counts.faults += 1

            phase("IdP stopped", idp_down, idp.start, OUTAGE)
            phase("HTTP 5xx", lambda: proxy.set_fault(STATUS, status=503), proxy.passthrough, 3)
            phase("HTTP 500 HTML", lambda: proxy.set_fault(STATUS, status=500, body=b"<h1>oops</h1>"),
                  proxy.passthrough, 2)  # fmt: skip
            phase("garbage body", lambda: proxy.set_fault(GARBAGE), proxy.passthrough, 2)
            phase("truncated JSON", lambda: proxy.set_fault(GARBAGE, body=b'{"access_token": "x'), proxy.passthrough, 2)
            phase("connection reset", lambda: proxy.set_fault(RESET), proxy.passthrough, 3)
            # A lost response: the IdP issued (and rotated) but the operator never heard.
            # Not for the refresh_token-only credential: with a rotating refresh token and
            # no way to re-authenticate, no client can survive losing that response.
            phase(
                "lost response",
                lambda: proxy.set_fault(LOSE, match=lambda r: r.client_id in (CC_CLIENT, PASSWORD_CLIENT), limit=2),
                proxy.passthrough,
                1,
            )
            counts.details.append(
                "lost: " + ", ".join(f"{r.client_id} {r.grant_type}" for r in proxy.requests if r.fault == LOSE)
            )
            # The IdP never hears of the refresh_token-only credential's lost request here.
            assert all(r.client_id != RT_ONLY_CLIENT for r in proxy.requests if r.fault == LOSE)
            time.sleep(1)  # one more sampling round after the last renewal
        counts.faults += proxy.faults + proxy.upstream_failures
        tally_harm(counts, cluster, idp, names, sampler, proxy, reused_before=reuse_before_restarts)
        counts.details.append(f"faults by mode: {dict(proxy.faults_by_mode)}, {sampler.samples} samples")
    counts.assert_clean()


RETRY_AFTER = 3.0
#: How long the rate-limiting gateway takes to answer. Retry-After counts from the
#: answer (RFC 9110 10.2.3), so a slow 429 tells apart "3 s after the answer" from
#: "3 s after the attempt began".
SLOW_ANSWER = 0.5


def test_rate_limited_with_retry_after(counts, kube, kube_api, make_idp):
    """IdP answers 429 with Retry-After"""
    idp = make_idp(access_token_lifetime=60)
    idp.reset_counters()
    cluster = Cluster(kube_api)
    with FaultProxy(idp.url) as proxy:
        specs = credential_world(cluster, idp, proxy.token_url, refresh_token=0)
        names = list(specs)
        sampler = SecretSampler([(kube.url, "default", n) for n in names], introspect=lambda t: idp.introspect(t))
        with running_operator(kube.url, settings=OperatorSettings(**SETTINGS)), sampler:
            cluster.apply_until_ready(specs)
            before = {n: cluster.secret_data(n)["access_token"] for n in names}
            # Two 429s per credential, then the IdP answers again.
            answered: dict[str, int] = {}

            def first_two(request) -> bool:
                answered[request.client_id] = answered.get(request.client_id, 0) + 1
                return answered[request.client_id] <= 2

            proxy.set_fault(STATUS, status=429, headers={"Retry-After": str(int(RETRY_AFTER))},
                            body=b'{"error": "slow_down"}', match=first_two)  # fmt: skip
            proxy.on_request = lambda request: time.sleep(SLOW_ANSWER) or False
            started = time.time()
            for name in names:
                request_refresh(kube.url, "default", name, "2026-01-01T00:00:00Z")
            held: dict[str, set[str]] = {n: set() for n in names}

            def renewed() -> bool:
                done = True
                for name in names:
                    token = (cluster.secret_data(name) or {}).get("access_token", "")
                    if token == before[name] or not token:
                        held[name].add(token)
                        done = False
                return done and _recovered(cluster, names, "2026-01-01T00:00:00Z")

            counts.check(eventually(renewed, 20), "the credentials did not renew after the 429s")
        for client in (CC_CLIENT, PASSWORD_CLIENT):
            requests = proxy.token_requests(client, since=started)
            limited = [(a, b) for a, b in itertools.pairwise(requests) if a.status == 429]
            counts.check(len(limited) >= 2, f"{client}: expected two 429s each followed by a retry, saw "
                         f"{[(round(r.at - started, 2), r.status) for r in requests]}")  # fmt: skip
            for answer, retry in limited:
                assert answer.answered_at is not None
                waited = retry.at - answer.answered_at
                counts.details.append(f"{client}: retried {waited:.2f} s after a 429 (Retry-After {RETRY_AFTER:.0f})")
                counts.check(waited >= RETRY_AFTER - 0.01, f"{client} retried {waited:.2f} s after a 429 "
                             f"with Retry-After: {RETRY_AFTER:.0f}")  # fmt: skip
        for name in names:
            counts.check(held[name] <= {before[name]}, f"{name}: the Secret lost its valid token during the 429s")
        counts.faults += proxy.faults
        tally_harm(counts, cluster, idp, names, sampler, proxy)
    counts.assert_clean()


def test_a_restart_during_a_429_still_waits_out_retry_after(kube, kube_api, make_idp):
    """An operator restarted between a 429 and its retry keeps the IdP's Retry-After.

    The backoff alone (0.5 s here) would have the new process retry at once.
    """
    idp = make_idp(access_token_lifetime=60)
    cluster = Cluster(kube_api)
    settings = OperatorSettings(**SETTINGS)
    stamp = "2026-01-02T00:00:00Z"
    with FaultProxy(idp.url) as proxy:
        specs = credential_world(cluster, idp, proxy.token_url, password=0, refresh_token=0)
        (name,) = specs
        with running_operator(kube.url, settings=settings):
            cluster.apply_until_ready(specs)
            before = cluster.secret_data(name)["access_token"]
            proxy.set_fault(STATUS, status=429, headers={"Retry-After": str(int(RETRY_AFTER))},
                            body=b'{"error": "slow_down"}', limit=1)  # fmt: skip
            started = time.time()
            request_refresh(kube.url, "default", name, stamp)
            wait_until(lambda: ((cluster.credential(name) or {}).get("status") or {}).get("failedAttempts") == 1,
                       what="the 429 on status")  # fmt: skip
        with running_operator(kube.url, settings=settings):
            wait_until(lambda: _recovered(cluster, [name], stamp), timeout=20, what="renewed after Retry-After")
        requests = proxy.token_requests(CC_CLIENT, since=started)
        assert [r.status for r in requests] == [429, 200], requests
        limited, retry = requests
        assert limited.answered_at is not None
        waited = retry.at - limited.answered_at
        assert waited >= RETRY_AFTER - 0.01, f"retried {waited:.2f} s after a 429 with Retry-After: {RETRY_AFTER:.0f}"
        assert cluster.secret_data(name)["access_token"] != before
    assert not cluster.leak_report()


#: The shipped backoff (5 s doubling up to 5 min): after two failed attempts, the next
#: is further away than the time the token has left.
SHIPPED_BACKOFF = {"metrics_port": 0}


def test_outage_shorter_than_the_token_life_is_invisible(counts, kube, kube_api, make_idp):
    """IdP outage outlasting backoff, within token life"""
    idp = make_idp(access_token_lifetime=LIFETIME)
    cluster = Cluster(kube_api)
    with FaultProxy(idp.url) as proxy:
        specs = credential_world(cluster, idp, proxy.token_url, refresh={"renewBefore": "12s"})
        names = list(specs)
        sampler = SecretSampler([(kube.url, "default", n) for n in names], introspect=lambda t: idp.introspect(t))
        with running_operator(kube.url, settings=OperatorSettings(**SHIPPED_BACKOFF)), sampler:
            cluster.apply_until_ready(specs)
            expiries = [
                time.mktime(time.strptime(cluster.secret_data(n)["expires_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
                for n in names
            ]
            # Down from now (before the renewals, due 12 s before expiry) until 1.5 s before
            # the first token expires: every renewal meets ~10.5 s of outage, less than the
            # 12 s its token had left.
            proxy.set_fault(STATUS, status=503)
            time.sleep(max(0.0, min(expiries) - 1.5 - time.time()))
            proxy.passthrough()
            counts.faults += proxy.faults
            counts.details.append(f"{proxy.faults} requests met the outage")
            counts.check(proxy.faults >= 2 * len(names), f"only {proxy.faults} requests met the outage")
            time.sleep(max(0.0, max(expiries) + 2 - time.time()))  # every token's old expiry has passed
            counts.check(
                eventually(lambda: not valid_token_problems(cluster, idp, names), 5),
                "not every credential was Ready with an active token after the outage",
            )
        tally_harm(counts, cluster, idp, names, sampler, proxy)
    counts.assert_clean()
