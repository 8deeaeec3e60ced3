"""API-server faults under the real operator: 5xx, 429, answers lost after a write landed,
genuine 409s from another writer, and every watch connection dropped at once.

The emulator is :class:`support.api_faults.FaultyCluster`. Faults hit the operator's
writes (the test itself writes nothing meanwhile; its sampler only lists Secrets).
Tokens live 12 s and renew with 60% left, so renewals, state saves and status writes
happen all through each phase, and a Secret may never hold an expired token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from support.api_faults import FaultyCluster
from support.faults import FaultProxy, SecretSampler, credential_world, tally_harm, valid_token_problems
from support.kube import PROJECT_CRDS
from support.operator import Cluster, eventually, running_operator
from tokensync.devkit.kube import RunningCluster, cluster_in_thread, read_crds
from tokensync.models.settings import OperatorSettings

LIFETIME = 12
REFRESH = {"renewBeforePercentage": 60}
SETTINGS = {"backoff_initial": 0.5, "backoff_max": 2.0, "metrics_port": 0}
PHASE = LIFETIME * 0.5  # each phase spans at least one renewal of every credential


def _writes(method: str, path: str) -> bool:
    return method in ("POST", "PUT", "PATCH", "DELETE")


def _secret_writes(method: str, path: str) -> bool:
    return method in ("PUT", "PATCH", "POST") and "/secrets" in path


@pytest.fixture
def faulty_kube() -> Iterator[RunningCluster]:
    with cluster_in_thread(emulator=FaultyCluster(), crds=read_crds(PROJECT_CRDS)) as cluster:
        yield cluster


def test_api_server_errors_conflicts_and_dropped_watches(counts, faulty_kube, make_idp):
    """API server 5xx, 429, lost answers, 409s, dropped watches"""
    import kubernetes.client

    kube = faulty_kube
    emulator: FaultyCluster = kube.emulator  # type: ignore[assignment]
    idp = make_idp(access_token_lifetime=LIFETIME)
    idp.reset_counters()
    with kubernetes.client.ApiClient(kube.kube_configuration()) as kube_api, FaultProxy(idp.url) as proxy:
        cluster = Cluster(kube_api)
        specs = credential_world(cluster, idp, proxy.token_url, refresh=REFRESH)
        names = list(specs)
        sampler = SecretSampler([(kube.url, "default", n) for n in names], introspect=lambda t: idp.introspect(t))
        with running_operator(kube.url, settings=OperatorSettings(**SETTINGS)), sampler:
            cluster.apply_until_ready(specs)
            renewals = proxy.token_requests()

            def phase(label: str, inject: Any) -> None:
                before = sum(emulator.injected.values())
                started = time.strftime("%H:%M:%S")
                inject()
                time.sleep(PHASE)
                emulator.clear_faults()
                counts.details.append(f"{label}: {sum(emulator.injected.values()) - before} injected from {started}")

            phase("5xx on writes", lambda: emulator.inject("status", match=_writes, limit=8, status=503))
            phase("429 with Retry-After", lambda: emulator.inject("status", match=_writes, limit=6, status=429,
                                                                  retry_after=1))  # fmt: skip
            phase("write landed, 500 answered",
                  lambda: emulator.inject("applied-then-status", match=_secret_writes, limit=6, status=500))  # fmt: skip
            phase("write landed, answer lost",
                  lambda: emulator.inject("applied-then-reset", match=_secret_writes, limit=6))  # fmt: skip
            phase("connection reset before the write",
                  lambda: emulator.inject("reset", match=_writes, limit=6))  # fmt: skip
            phase("409 from another writer", lambda: emulator.inject("conflict", match=_secret_writes, limit=8))

            def drop_watches() -> None:
                for _ in range(3):

                    async def drop() -> int:
                        return emulator.drop_watches()

                    kube.call(drop())
                    time.sleep(PHASE / 3)

            phase("every watch dropped, 3x", drop_watches)
            # After the faults: every credential renews again and stays fresh.
            time.sleep(LIFETIME)
            counts.check(
                eventually(lambda: not valid_token_problems(cluster, idp, names), 15),
                "not every credential was Ready with an active token after the faults",
            )
            counts.check(
                len(proxy.token_requests()) > len(renewals) + 2 * len(names),
                "the credentials did not keep renewing through the faults",
            )
        counts.faults = sum(emulator.injected.values())
        tally_harm(counts, cluster, idp, names, sampler, proxy)
        counts.details.append(f"faults by mode: {dict(emulator.injected)}, {sampler.samples} samples")
    counts.check(emulator.injected["watch dropped"] >= 3, "no watch connection was open to drop")
    counts.assert_clean()
