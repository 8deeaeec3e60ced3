"""The fault suite's instruments see what they count: a zero elsewhere means something."""

from __future__ import annotations

import time

import httpx

from support.faults import RT_ONLY_CLIENT, FaultProxy, SecretSampler, bootstrap_refresh_token
from support.operator import Cluster, wait_until


def test_a_refresh_token_spent_twice_is_counted_by_the_idp_and_the_proxy(idp):
    token = bootstrap_refresh_token(idp)
    before = idp.admin.refresh_token_reuse_count(RT_ONLY_CLIENT)
    with FaultProxy(idp.url) as proxy:
        auth = (RT_ONLY_CLIENT, idp.client_secret(RT_ONLY_CLIENT))
        form = {"grant_type": "refresh_token", "refresh_token": token}
        first = httpx.post(proxy.token_url, data=form, auth=auth)
        second = httpx.post(proxy.token_url, data=form, auth=auth)
        assert first.status_code == 200
        assert second.status_code == 400 and second.json()["error"] == "invalid_grant"
        assert proxy.refresh_tokens_spent_twice == 1
        # The rotated token is dead too: reuse protection revoked the whole family.
        third = httpx.post(proxy.token_url, data={**form, "refresh_token": first.json()["refresh_token"]}, auth=auth)
        assert third.status_code == 400
    assert idp.admin.refresh_token_reuse_count(RT_ONLY_CLIENT) - before == 2


def test_the_sampler_counts_an_expired_token_unless_tolerated(kube, kube_api):
    cluster = Cluster(kube_api)
    past = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    cluster.apply_secret("old", {"access_token": "an-expired-token", "expires_at": past})
    with SecretSampler([(kube.url, "default", "old")]) as strict:
        wait_until(lambda: strict.expired_samples >= 2, timeout=5, what="expired samples")
    with SecretSampler([(kube.url, "default", "old")], tolerated=lambda t: True) as lenient:
        wait_until(lambda: lenient.tolerated_samples >= 2, timeout=5, what="tolerated samples")
    assert lenient.expired_samples == 0
