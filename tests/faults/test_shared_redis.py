"""Two operator processes on one Redis, same key prefix, rotating refresh tokens.

* two clusters: each process has its own API emulator holding the same credentials
  (one GitOps repository applied to two clusters), and both keep them in one Redis;
* two replicas: both processes serve the same emulator (a Deployment scaled to 2).

Either way the two share every credential's Redis entry and race for each renewal.
A rotating refresh token must never be spent twice, and no credential may be lost.
"""

from __future__ import annotations

import time

import pytest

from support.faults import (
    PASSWORD_CLIENT,
    RT_ONLY_CLIENT,
    FaultProxy,
    SecretSampler,
    bootstrap_refresh_token,
    credential_world,
    scan_for_leaks,
    valid_token_problems,
)
from support.kube import PROJECT_CRDS
from support.operator import Cluster, eventually
from tokensync.devkit.kube import cluster_in_thread, read_crds

LIFETIME = 6
DURATION = 25.0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("topology", ["two clusters", "two replicas"])
def test_two_operators_share_one_redis(counts, topology, kube, make_idp, redis_url, operators):
    """Two operators, one Redis"""
    counts.scenario = f"Two operators, one Redis ({topology})"
    idp = make_idp(access_token_lifetime=LIFETIME)
    idp.reset_counters()
    settings = {
        "namespaces": ["default"],
        "default_store": "redis",
        "redis_url": redis_url,
        "metrics_port": 0,
        "backoff_initial": 0.5,
        "backoff_max": 2.0,
    }
    import kubernetes.client

    with FaultProxy(idp.url) as proxy, cluster_in_thread(crds=read_crds(PROJECT_CRDS)) as other:
        urls = [kube.url, other.url] if topology == "two clusters" else [kube.url, kube.url]
        apis = [kubernetes.client.ApiClient(kube.kube_configuration())]
        if topology == "two clusters":
            apis.append(kubernetes.client.ApiClient(other.kube_configuration()))
        clusters = [Cluster(api) for api in apis]
        bootstraps = {"rt-0": bootstrap_refresh_token(idp)}  # the same credential in both clusters
        names: list[str] = []
        for cluster in clusters:
            specs = credential_world(cluster, idp, proxy.token_url, bootstraps=bootstraps)
            names = list(specs)
            for name, spec in specs.items():
                cluster.apply_credential(name, spec)
        pids = [
            operators.spawn(url, settings, f"shared-{topology.replace(' ', '-')}-{i}.log") for i, url in enumerate(urls)
        ]
        counts.faults += len(pids) - 1  # the second writer
        sources = [(url, "default", n) for url in dict.fromkeys(urls) for n in names]
        sampler = SecretSampler(sources, introspect=lambda t: idp.introspect(t))
        try:
            with sampler:
                for i, cluster in enumerate(clusters):
                    counts.check(
                        eventually(lambda c=cluster: all(c.ready(n) for n in names), 40),
                        f"cluster {i}: not all Ready within 40 s: "
                        + str({n: (cluster.condition(n) or {}).get("message", "")[:200] for n in names}),
                    )
                time.sleep(DURATION)  # both operators renew the same credentials, every ~5 s
                counts.check(all(operators.alive(pid) for pid in pids), "an operator process died while sharing Redis")
        finally:
            for pid in pids:
                operators.terminate(pid)
        problems = [f"cluster {i}: {p}" for i, c in enumerate(clusters) for p in valid_token_problems(c, idp, names)]
        counts.lost = len(problems)
        counts.expired = sampler.expired_samples
        counts.spent_twice = max(idp.refresh_token_reuse_count(), proxy.refresh_tokens_spent_twice)
        leaked = [p for c in clusters for p in c.leak_report()] + scan_for_leaks(
            {"operator logs": operators.log_text()}
        )
        counts.leaked += len(leaked)
        counts.details += problems + sampler.violations + leaked + proxy.reuse_report()
        counts.details.append(
            "spent twice per client (IdP): "
            + str({c: idp.refresh_token_reuse_count(c) for c in (PASSWORD_CLIENT, RT_ONLY_CLIENT)})
        )
        renewals = len(proxy.token_requests(since=0))
        counts.details.append(f"{renewals} token requests, {sampler.samples} samples")
        for api in apis:
            api.close()
    counts.assert_clean()
