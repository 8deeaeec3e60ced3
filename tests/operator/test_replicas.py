"""Several operators on one store, and a store that goes away: what a user sees.

Two clusters sharing one Redis (or two replicas in one cluster) hold the same
rotating refresh token. The identity provider (django-oauth-toolkit with
rotation and reuse protection) revokes the whole family when one is presented
twice, which would show as a password re-grant; the lease and compare-and-swap
must make that never happen.
"""

from __future__ import annotations

import json
import time

import redis

from support.kube import PROJECT_CRDS
from support.operator import Cluster, running_operator, wait_until
from tokensync.devkit.kube import cluster_in_thread, read_crds
from tokensync.models.settings import OperatorSettings
from tokensync.models.state import StoredCredential


def password_spec(idp, store="redis"):
    return {
        "issuer": {"tokenURL": idp.token_url},
        "grant": {
            "type": "password",
            "clientID": "pw-client",
            "clientSecretRef": {"name": "pw", "key": "secret"},
            "usernameRef": {"name": "alice", "key": "username"},
            "passwordRef": {"name": "alice", "key": "password"},
        },
        "store": {"backend": store},
    }


def seed(cluster: Cluster, idp) -> None:
    cluster.apply_secret("pw", {"secret": idp.client_secret("pw-client")})
    cluster.apply_secret("alice", {"username": "alice", "password": idp.password("alice")})


def settings(redis_url: str, identity: str) -> OperatorSettings:
    return OperatorSettings(
        redis_url=redis_url, identity=identity, backoff_initial=0.5, backoff_max=5, metrics_port=0, expiry_skew=1
    )


def expires_in(cluster: Cluster, name: str) -> float:
    data = cluster.secret_data(name)
    assert data is not None
    return time.mktime(time.strptime(data["expires_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone + 1 - time.time()


def test_two_clusters_on_one_redis_spend_each_rotating_refresh_token_once(kube, kube_api, make_idp, redis_url):
    idp = make_idp(fresh=True, access_token_lifetime=6)
    east = Cluster(kube_api)
    seed(east, idp)
    with cluster_in_thread(crds=read_crds(PROJECT_CRDS)) as other:
        import kubernetes.client

        with kubernetes.client.ApiClient(other.kube_configuration()) as other_api:
            west = Cluster(other_api)
            seed(west, idp)
            with (
                running_operator(kube.url, settings=settings(redis_url, "east-0")),
                running_operator(other.url, settings=settings(redis_url, "west-0")),
            ):
                east.apply_credential("api", password_spec(idp))
                west.apply_credential("api", password_spec(idp))
                wait_until(lambda: east.ready("api") and west.ready("api"), what="both Ready")
                grants = idp.token_request_count("pw-client", "password")
                refreshes = idp.token_request_count("pw-client", "refresh_token")
                deadline = time.time() + 16
                while time.time() < deadline:
                    for cluster in (east, west):
                        assert expires_in(cluster, "api") > 0, "a Secret held an expired token"
                    time.sleep(0.25)
                assert east.ready("api") and west.ready("api")
                for cluster in (east, west):
                    token = cluster.secret_data("api")["access_token"]
                    assert idp.introspect(token)["active"]
            assert not west.leak_report()
    assert not east.leak_report()
    assert idp.refresh_token_reuse_count("pw-client") == 0
    # No family was revoked, so nobody had to fall back to the password.
    assert idp.token_request_count("pw-client", "password") == grants
    # One refresh per token lifetime for the shared credential, not one per cluster.
    spent = idp.token_request_count("pw-client", "refresh_token") - refreshes
    assert 2 <= spent <= 5, spent


def test_two_replicas_in_one_cluster_on_the_secret_store_spend_each_refresh_token_once(kube, kube_api, make_idp):
    idp = make_idp(fresh=True, access_token_lifetime=6)
    cluster = Cluster(kube_api)
    seed(cluster, idp)

    def replica(identity: str) -> OperatorSettings:
        return OperatorSettings(identity=identity, backoff_initial=0.5, backoff_max=5, metrics_port=0, expiry_skew=1)

    with running_operator(kube.url, settings=replica("pod-a")), running_operator(kube.url, settings=replica("pod-b")):
        cluster.apply_credential("api", password_spec(idp, store="secret"))
        wait_until(lambda: cluster.ready("api"), what="Ready")
        grants = idp.token_request_count("pw-client", "password")
        deadline = time.time() + 14
        while time.time() < deadline:
            assert expires_in(cluster, "api") > 0, "the Secret held an expired token"
            time.sleep(0.25)
        assert cluster.ready("api"), cluster.condition("api")
    assert idp.refresh_token_reuse_count("pw-client") == 0
    assert idp.token_request_count("pw-client", "password") == grants
    assert not cluster.leak_report()


def test_redis_down_keeps_tokens_fresh_from_memory_and_says_so(kube, kube_api, make_idp, redis_server, redis_url):
    idp = make_idp(fresh=True, access_token_lifetime=6)
    cluster = Cluster(kube_api)
    seed(cluster, idp)
    with running_operator(kube.url, settings=settings(redis_url, "solo")):
        cluster.apply_credential("api", password_spec(idp))
        wait_until(lambda: cluster.ready("api"), what="Ready")
        redis_server.stop()
        try:
            wait_until(
                lambda: (cluster.condition("api", "Reconciling") or {}).get("reason") == "StoreUnavailable",
                timeout=15,
                what="StoreUnavailable on status",
            )
            tokens_while_down = set()
            deadline = time.time() + 10
            while time.time() < deadline:
                assert expires_in(cluster, "api") > 0, "the Secret held an expired token while Redis was down"
                assert cluster.ready("api"), cluster.condition("api")
                tokens_while_down.add(cluster.secret_data("api")["access_token"])
                time.sleep(0.25)
            assert len(tokens_while_down) >= 2, "renewals stopped while Redis was down"
        finally:
            redis_server.start()
        wait_until(lambda: cluster.condition("api", "Reconciling") is None, timeout=20, what="recovered")
    # The token set renewed from memory reached Redis: what pods hold is what a restart continues from.
    stored = StoredCredential.from_json(redis.Redis.from_url(redis_url).get("tokensync:default/api"))
    published = cluster.secret_data("api")["access_token"]
    assert stored.token_set.access_token.get_secret_value() == published
    assert idp.introspect(published)["active"]
    assert idp.refresh_token_reuse_count("pw-client") == 0
    assert not cluster.leak_report()


def test_a_lease_left_by_a_dead_process_is_polled_not_hammered(kube, kube_api, make_idp, redis_url):
    """A replica that died holding the lease: the survivor waits for it calmly, then renews.

    The token pods hold is still good, so there is no hurry: the survivor looks at the
    lease every few seconds, rather than in a loop against Redis until the lease runs out.
    """
    idp = make_idp(fresh=True, access_token_lifetime=30)
    cluster = Cluster(kube_api)
    seed(cluster, idp)
    spec = {**password_spec(idp), "refresh": {"renewBeforePercentage": 90, "minInterval": "1s"}}
    client = redis.Redis.from_url(redis_url)
    try:
        with running_operator(kube.url, settings=settings(redis_url, "survivor")):
            cluster.apply_credential("api", spec)
            wait_until(lambda: cluster.ready("api"), what="Ready")
            first = cluster.secret_data("api")["access_token"]
            # A replica took the lease and was SIGKILLed: its record stays until it expires.
            seconds, micros = client.time()
            held_until = seconds + micros / 1e6 + 12
            client.set("tokensync:default/api:lease", json.dumps({"owner": "ghost", "until": held_until}))
            client.config_resetstat()
            # The renewal comes due about 3 s after issue and waits for the lease until it is released.
            time.sleep(9)
            calls = sum(stats["calls"] for name, stats in client.info("commandstats").items()
                        if name not in ("cmdstat_info", "cmdstat_config", "cmdstat_time"))  # fmt: skip
            assert cluster.secret_data("api")["access_token"] == first
            assert cluster.ready("api"), cluster.condition("api")
            assert calls <= 20, f"{calls} Redis commands in 9 s while waiting for a dead process's lease"
            wait_until(lambda: cluster.secret_data("api")["access_token"] != first, timeout=15, what="renewed")
            assert expires_in(cluster, "api") > 0
            assert cluster.ready("api"), cluster.condition("api")
    finally:
        client.close()
    assert idp.refresh_token_reuse_count("pw-client") == 0
    assert not cluster.leak_report()
